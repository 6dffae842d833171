"""apps/train_bundled_backbone.py: the export travels back from a GPU machine in parts and is joined here,
checked against its SHA-256."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "apps" / "train_bundled_backbone.py"


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("train_bundled_backbone", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parts_round_trip_and_a_cut_part_is_refused(app, tmp_path):
    data = hashlib.sha512(b"seed").digest() * 40000  # 2.5 MB
    export = tmp_path / "model.safetensors"
    export.write_bytes(data)
    parts = app.split_file(export, tmp_path / "back", part_mb=1.0)
    assert [p.name for p in parts] == [f"model.safetensors.part{i:02d}" for i in range(3)]
    assert all(p.stat().st_size <= 2**20 for p in parts)
    assert app.join_parts(tmp_path / "back", tmp_path / "joined.safetensors").read_bytes() == data
    parts[1].write_bytes(parts[1].read_bytes()[:-10])  # a transfer cut short
    with pytest.raises(SystemExit, match="do not match"):
        app.join_parts(tmp_path / "back", tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()


def test_recipe_passes_the_warm_start_the_clock_and_the_pack(app, tmp_path):
    import argparse

    for sub in ("photos", "cutouts", "backgrounds"):
        (tmp_path / sub).mkdir()
    args = argparse.Namespace(data=tmp_path, arch="vit_small_patch8_224", batch_size=64, local_crops=8,
                              out_dim=8192, workers=2, momentum_teacher=0.99, init="vitdense_vits8", extra=[],
                              seed=0, composite_p=0.5)
    cmd = app.recipe(args, tmp_path / "run", repeat=3, time_limit=250.4)

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert value("--init") == "vitdense_vits8" and value("--repeat") == "3" and value("--time-limit") == "250"
    assert cmd[cmd.index("pretrain") + 1] == str(tmp_path / "photos")
    assert value("--cutouts") == str(tmp_path / "cutouts") and value("--backgrounds") == str(tmp_path / "backgrounds")
    plain = app.recipe(argparse.Namespace(**{**vars(args), "data": tmp_path / "photos"}), tmp_path / "run", 3, 100)
    assert "--cutouts" not in plain  # a plain image folder: no composites
