"""The public API: what ``vitdense`` exports, and the apps keeping to it."""
from __future__ import annotations

import ast
from pathlib import Path

import vitdense
import vitdense.cosegment
import vitdense.correspond
import vitdense.video

APPS = Path(__file__).resolve().parent.parent / "apps"


def test_every_exported_name_exists_and_is_listed_once():
    assert len(vitdense.__all__) == len(set(vitdense.__all__))
    assert [name for name in vitdense.__all__ if not hasattr(vitdense, name)] == []


def test_analyses_are_reachable_from_the_package():
    # the function keeps its module's name free: vitdense.cosegment stays the module
    assert vitdense.cosegment_objects is vitdense.cosegment.cosegment
    assert vitdense.find_correspondences is vitdense.correspond.find_correspondences
    assert vitdense.segment_video is vitdense.video.segment_video


def test_apps_import_only_the_public_api():
    """apps/ are examples of the public API: any ``vitdense.<module>`` or ``pretrain.<module>`` import there
    is a name to export."""
    private = []
    for script in sorted(APPS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("vitdense.", "pretrain.")):
                if node.module != "vitdense.cli":  # the command line is public too
                    private.append(f"{script.name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                private += [f"{script.name}: import {a.name}" for a in node.names
                            if a.name.startswith(("vitdense.", "pretrain."))]
    assert private == []
