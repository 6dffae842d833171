"""Bad output locations and interruptions across every command, from one table.

Each command the CLI registers (sub-commands of groups included) needs a row: how to call it with an output
location, and where an interruption can be injected. A command added to the CLI without a row fails
``test_every_command_has_a_row``. Every case must give exit code 2 with one ``vitdense: error: PATH: ...``
line (or 130 and ``vitdense: interrupted``) and leave nothing half-written.
"""
from __future__ import annotations

import click
import pytest

from conftest import run_cli

# command -> (arguments before --out, the option naming the written location, is it a folder, interrupt hook)
# {img}: a folder of images, {w}: a weights file; None: the command writes nothing.
ROWS = {
    "models": None,
    "serve": None,  # writes nothing (a server: its own tests send it bad requests and SIGHUP)
    "extract": (["{img}", "--weights", "{w}"], "--out", False, "vitdense.extractor.ViTExtractor.__init__"),
    "pca": (["{img}", "--weights", "{w}"], "--out", True, "vitdense.extractor.ViTExtractor.__init__"),
    "attention": (["{img}", "--weights", "{w}"], "--out", True, "vitdense.extractor.ViTExtractor.__init__"),
    "inspect": (["{img}", "--weights", "{w}"], "--out", False, "vitdense.extractor.ViTExtractor.__init__"),
    "cosegment": (["{img}", "--weights", "{w}"], "--out", True, "vitdense.extractor.ViTExtractor.__init__"),
    "part-cosegment": (["{img}", "--weights", "{w}"], "--out", True, "vitdense.extractor.ViTExtractor.__init__"),
    "correspond": (["{img}/a.png", "{img}/b.png", "--weights", "{w}"], "--out", True,
                   "vitdense.extractor.ViTExtractor.__init__"),
    "index": (["{img}", "--weights", "{w}"], "--out", True, "vitdense.extractor.ViTExtractor.__init__"),
    "search": (["{img}/a.png", "--index", "{img}"], "--out", True, "vitdense.collection.index.open_index"),
    "embed": (["{img}", "--weights", "{w}"], "--out", True, "vitdense.extractor.ViTExtractor.__init__"),
    "propagate": (["{img}", "--mask", "{img}/a.png", "--weights", "{w}"], "--out", True,
                  "vitdense.commands.video.open_job"),
    "eval-davis": (["--davis-root", "{img}"], "--results", True, "vitdense.davis.evaluate_davis"),
    "evaluate": (["--weights", "{w}", "--data", "{img}"], "--out", True, "vitdense.evalset.load_manifest"),
    "pretrain": (["{img}"], "--out", True, "pretrain.config.PretrainConfig.validate"),
    "retrieval-eval revisited": (["{img}", "--gnd", "{img}/a.png", "--weights", "{w}"], "--out", True,
                                 "vitdense.retrieval_eval.load_revisited_gnd"),
    "retrieval-eval knn": (["{img}", "{img}", "--weights", "{w}"], "--out", True,
                           "vitdense.commands.retrieval._labelled_folder"),
    "retrieval-eval copy": (["{img}", "--weights", "{w}"], "--out", True, "vitdense.io.load_images"),
}


def all_commands() -> list[str]:
    from vitdense.cli import main

    names = []
    for name, cmd in main.commands.items():
        if isinstance(cmd, click.Group):
            names += [f"{name} {sub}" for sub in cmd.commands]
        else:
            names.append(name)
    return sorted(names)


def test_every_command_has_a_row():
    missing = [c for c in all_commands() if c not in ROWS]
    assert not missing, f"commands without a row in ROWS (add how they write and where to interrupt): {missing}"
    assert not [r for r in ROWS if r not in all_commands()], "rows for commands that no longer exist"


@pytest.fixture
def setup(tmp_path):
    from PIL import Image

    img = tmp_path / "imgs"
    img.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (32, 32), (90, 120, 30)).save(img / f"{name}.png")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    return tmp_path, img, blocker


def _args(command: str, row: tuple, img, weights) -> list[str]:
    return [*command.split(), *(a.format(img=img, w=weights) for a in row[0])]


def _nothing_half_written(root) -> None:
    leftovers = [p for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    assert not leftovers, leftovers


CASES = ["parent_is_file", "wrong_kind", "read_only", "interrupt"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", sorted(c for c, r in ROWS.items() if r is not None))
def test_bad_output_and_interruption(command, case, setup, monkeypatch):
    import os

    tmp_path, img, blocker = setup
    row = ROWS[command]
    weights = tmp_path / "missing.pth"  # never read when the output is refused first
    args = _args(command, row, img, weights)
    option, folder = row[1], row[2]
    if case == "parent_is_file":
        target = blocker / "out"
        expected = (2, f"vitdense: error: {target}: cannot be written, {blocker} is a file")
    elif case == "wrong_kind":
        target = blocker if folder else img
        expected = (2, f"vitdense: error: {target}: " + ("exists and is not a folder" if folder else "is a folder"))
    elif case == "read_only":
        locked = tmp_path / "locked"
        locked.mkdir()
        target = locked / "out"
        # root writes into a 0o555 folder anyway (as in many containers): make the access check say no
        real_access = os.access
        monkeypatch.setattr("vitdense.io.os.access", lambda p, mode: False if str(p) == str(locked)
                            else real_access(p, mode))
        expected = (2, f"vitdense: error: {target}: cannot be written, no write permission in {locked}")
    else:
        target = tmp_path / "fresh_out"
        if command == "eval-davis":
            target.mkdir()  # the results to evaluate
        weights.write_bytes(b"")  # exists; the interruption comes before it is read
        args = _args(command, row, img, weights)

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(row[3], interrupted)
        expected = (130, "vitdense: interrupted")
    result = run_cli(*args, option, target)
    lines = [line for line in result.output.splitlines() if line.startswith("vitdense")]
    assert (result.exit_code, len(lines)) == (expected[0], 1), result.output
    assert lines[0].startswith(expected[1]), (lines[0], expected[1])
    assert "Traceback" not in result.output
    if case == "interrupt" and command != "pretrain":
        assert not target.exists() or not any(target.iterdir())
    _nothing_half_written(tmp_path)
