"""The prepared device session (benchmarks/device_session.py), rehearsed on the CPU at toy size with the same
code and scaled-down deadlines: it keeps its budget, brings everything back in at most 8 files, and its
export's parts join into weights that load, with the chain of runs in their metadata."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_gives_the_suite_what_training_and_tests_leave():
    session = _module(REPO / "benchmarks" / "device_session.py")
    plan = session.plan_steps(580, 300, 50)
    assert plan["suite"] == 580 - session.SETUP_S - 300 - 50 - session.PACK_S
    assert sum(plan.values()) == 580
    with pytest.raises(SystemExit, match="leaves"):
        session.plan_steps(400, 300, 50)


@pytest.mark.slow
def test_rehearsal_keeps_its_budget_and_brings_back_a_loadable_export(tmp_path):
    out = tmp_path / "OUT"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_session.py"), "--out", str(out),
                        "--rehearse"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and not [f for f in files if f.endswith(".tmp")], files
    assert {"session.json", "session.log", "reports.tar.gz", "vitdense_vits8.safetensors.sha256"} <= set(files)

    state = json.loads((out / "session.json").read_text())
    assert state["finished"] and state["seconds"] <= state["budget_s"]
    steps = {s["step"]: s for s in state["steps"]}
    assert set(steps) >= {"train", "suite", "tests"}
    for s in steps.values():
        assert s["status"] == "ok" and s["seconds"] <= s["deadline_s"], s

    with tarfile.open(out / "reports.tar.gz") as tar:
        names = set(tar.getnames())
        summary = json.load(tar.extractfile("train/train_summary.json"))
        log = tar.extractfile("train/log.jsonl").read().decode().splitlines()
        junit = tar.extractfile("tests/gpu_tests.xml").read().decode()
    assert {"train/command.txt", "train/curves.png", "suite/summary.md", "suite/pretrain.json",
            "suite/extract.json", "suite/analyses.json"} <= names
    # training was planned by the clock and saved in time; the GPU tests were collected (and skip on a CPU)
    assert summary["status"] == "ok" and summary["steps"] > 0 and summary["planned_steps"]
    assert any('"planned_steps"' in line for line in log)
    n_gpu = (REPO / "tests" / "test_gpu.py").read_text().count("\ndef test_")
    assert f'tests="{n_gpu}"' in junit and f'skipped="{n_gpu}"' in junit

    app = _module(REPO / "apps" / "train_bundled_backbone.py")
    weights = app.join_parts(out, tmp_path / "joined.safetensors")
    from vitdense import ViTExtractor, read_weights

    _, meta = read_weights(weights)
    assert meta["name"] == "vitdense_vits8" and len(meta["chain"]) == 1
    assert meta["chain"][0]["steps"] == summary["steps"]
    ViTExtractor(weights=weights, stride=8, device="cpu")


def test_a_new_bundled_file_ships_only_when_it_beats_the_floor_and_the_current_one():
    session = _module(REPO / "benchmarks" / "device_session.py")

    def card(new_coseg, new_sal, cur=(0.17, 0.09), floor=(0.14, 0.12)):
        return {label: {"coseg": {"jaccard": c}, "saliency": {"jaccard": s}}
                for label, (c, s) in (("new", (new_coseg, new_sal)), ("vitdense_vits8", cur), ("random init", floor))}

    assert session.ship_decision(card(0.30, 0.20), "new", "vitdense_vits8")[0]
    assert not session.ship_decision(card(0.30, 0.10), "new", "vitdense_vits8")[0]  # saliency below the floor
    assert not session.ship_decision(card(0.16, 0.20), "new", "vitdense_vits8")[0]  # coseg below the current
    ok, lines = session.ship_decision(card(0.30, 0.10), "new", "vitdense_vits8")
    assert lines[1] == "saliency jaccard: new 0.100 vs vitdense_vits8 0.090, random init 0.120 -> NOT better"


def test_warm_start_from_the_bundled_file_continues_its_chain():
    from pretrain.warmstart import load_warm_start
    from vitdense import read_weights

    _, meta = read_weights(REPO / "vitdense" / "weights" / "vitdense_vits8.safetensors")
    chain = load_warm_start("vitdense_vits8").chain
    assert chain and chain[-1]["steps"] == meta["trained_steps"]
