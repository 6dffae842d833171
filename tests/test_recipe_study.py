"""apps/recipe_study.py end to end at toy size: two variants of a tiny recipe, two steps each, graded in one
report card on the tiny evaluation set; and the variant syntax it refuses."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_evaluate import write_tiny_eval_set
from test_pretrain_run import TINY_ARGS

APP = Path(__file__).resolve().parents[1] / "apps" / "recipe_study.py"


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("recipe_study", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _image_folder(folder: Path, n: int = 12, size: int = 48) -> Path:
    """Random-coloured rectangles on noise: enough for the loader and the crops."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        im = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        im[top:top + size // 2, left:left + size // 2] = rng.integers(0, 255, 3)
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    return folder


def test_two_variants_are_trained_alike_and_graded_in_one_report(app, tmp_path):
    data = _image_folder(tmp_path / "images")
    evalset = write_tiny_eval_set(tmp_path / "eval")
    out = tmp_path / "study"
    app.main([str(data), "--out", str(out), "--max-steps", "2", "--variant", "base=", "--variant",
              "dim32=--out-dim 32", "--eval-data", str(evalset), "--load-size", "48", "--knn-size", "32",
              "--", *TINY_ARGS, "--batch-size", "6", "--epochs", "1", "--workers", "0"])

    study = json.loads((out / "study.json").read_text())
    assert [v["name"] for v in study["variants"]] == ["base", "dim32"]
    for v in study["variants"]:
        config = json.loads((out / "runs" / v["name"] / "config.json").read_text())
        assert (config["max_steps"], config["seed"]) == (2, 0)
        assert v["steps"] == 2 and v["minutes"] > 0
        assert all(np.isfinite(v["final"][k]) for k in ("loss", "teacher_entropy", "kl"))
        assert 0 < v["final"]["teacher_entropy"] <= np.log(v["out_dim"]) + 1e-4
        for task, metric, _ in app.COLUMNS:
            assert np.isfinite(v["scores"][task][metric]), (task, metric)
    assert [v["out_dim"] for v in study["variants"]] == [64, 32]  # the variant's flag wins over the base's
    # one report card: both variants and a single floor, labelled with the variant names
    report = json.loads((out / "report" / "report.json").read_text())
    assert list(report["scores"]) == ["base", "dim32", app.FLOOR]
    assert study["floor"] == report["scores"][app.FLOOR]
    assert study["variants"][1]["scores"] == report["scores"]["dim32"]
    table = (out / "study.md").read_text()
    for row in ("| base |", "| dim32 | `--out-dim 32`", f"| {app.FLOOR} |"):
        assert row in table

    # a second call with --keep-done grades again without retraining
    stamp = (out / "runs" / "base" / "teacher_backbone.pth").stat().st_mtime_ns
    app.main([str(data), "--out", str(out), "--max-steps", "2", "--variant", "base=", "--keep-done",
              "--eval-data", str(evalset), "--load-size", "48", "--knn-size", "32", "--tasks", "knn",
              "--", *TINY_ARGS, "--batch-size", "6", "--epochs", "1", "--workers", "0"])
    assert (out / "runs" / "base" / "teacher_backbone.pth").stat().st_mtime_ns == stamp
    assert [v["name"] for v in json.loads((out / "study.json").read_text())["variants"]] == ["base"]


@pytest.mark.parametrize("text, fragment", [("dim256", "NAME=FLAGS"), ("-x=--lr 1", "NAME=FLAGS"),
                                            ("a=--max-steps 3", "--max-steps"), ("b=--out=x", "--out")])
def test_bad_variants_are_refused_with_their_name(app, text, fragment):
    with pytest.raises(SystemExit, match=fragment):
        app.parse_variant(text)


def test_variant_flags_follow_the_base(app, tmp_path):
    variant = app.parse_variant("lr=--lr 0.004 --teacher-temp 0.02")
    cmd = app.pretrain_command(tmp_path, ["--lr", "0.002"], variant, tmp_path / "run", 5, 0)
    assert cmd[cmd.index("--lr") + 1] == "0.002" and cmd[len(cmd) - 1 - cmd[::-1].index("--lr") + 1] == "0.004"
    assert cmd[-6:] == ["--out", str(tmp_path / "run"), "--max-steps", "5", "--seed", "0"]


def test_a_byol_variant_shows_its_own_diagnostics(app, tmp_path):
    """A BYOL run's log has output_std instead of teacher entropy/KL: the end-of-run means and the table
    show each method's own columns."""
    run_dir = tmp_path / "byol"
    run_dir.mkdir()
    records = [{"step": s, "loss": 1.0 + s, "output_std": 0.5 + 0.01 * s, "momentum": 1.0} for s in range(1, 13)]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    last, final = app.end_of_run(run_dir, tail=4)
    assert last["step"] == 12 and final == pytest.approx({"loss": 11.5, "output_std": 0.605})
    dino = app.Variant("dino", [], minutes=1.0, steps=12, out_dim=64,
                       final={"loss": 4.0, "teacher_entropy": 3.0, "kl": 0.5}, scores={"coseg": {"jaccard": 0.2}})
    byol = app.Variant("byol", ["--method", "byol"], minutes=2.0, steps=12, out_dim=32, method="byol", final=final,
                       scores={"coseg": {"jaccard": 0.3}})
    study = {"data": "d", "base": [], "max_steps": 12, "seed": 0, "tasks": "coseg", "quick": False,
             "variants": [vars(dino), vars(byol)], "floor": {"coseg": {"jaccard": 0.1}}, "eval_minutes": 1.0,
             "whole_image_jaccard": 0.1, "knn_majority_top1": 10.0}
    table = app.study_markdown(study)
    assert "| dino | (base recipe) | 0.200 | – | – | 4.000 | 3.00 (4.16) | 0.500 | – | 1.0 |" in table
    assert "| byol | `--method byol` | **0.300** | – | – | 11.500 | – | – | 0.605 | 2.0 |" in table
