"""benchmarks/device_suite.py: options, deadlines, reports, and one part run end to end at toy size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "device_suite.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_suite  # noqa: E402
from _isolated import run_json  # noqa: E402


def run_suite(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=timeout)


def test_help_and_option_errors(tmp_path):
    shown = run_suite("--help")
    assert shown.returncode == 0 and "--toy" in shown.stdout and "device_suite.md" in shown.stdout
    assert run_suite().returncode == 2  # --out is required
    assert run_suite("--out", str(tmp_path), "--parts", "nope").returncode == 2
    assert run_suite("--out", str(tmp_path), "--budget-scale", "0").returncode == 2


def test_toy_plan_has_every_setting_of_the_device_plan():
    device, toy = device_suite.plan(False), device_suite.plan(True)
    assert set(device) == set(toy) == set(device_suite.PARTS)
    for part in device:
        assert set(device[part]) == set(toy[part]), part
    # the device settings: both archs, 2x224 + 10x96 crops, batch >= 256 for ViT-S/16, three sizes
    assert device["pretrain"]["archs"][0] == ["vit_small_patch16_224", 256]
    assert (device["pretrain"]["global_size"], device["pretrain"]["local_crops"]) == (224, 10)
    assert device["extract"]["sizes"] == [224, 448, 896]
    assert sum(device_suite.BUDGET_S.values()) <= 8 * 60


def test_run_json_kills_the_whole_group_at_the_deadline(tmp_path):
    marker = tmp_path / "child_alive"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).write_text('x')"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(30)"
    start = time.monotonic()
    r = run_json([sys.executable, "-c", code], timeout=1)
    assert r["status"] == "timeout" and time.monotonic() - start < 10
    time.sleep(3.5)
    assert not marker.exists()  # the grandchild went with its parent


def test_run_json_reports_a_partial_result_file_and_errors(tmp_path):
    result = tmp_path / "r.json"
    code = (f"import json, time; open({str(result)!r}, 'w').write(json.dumps({{'rows': [1]}})); "
            "import sys; sys.exit('boom')")
    r = run_json([sys.executable, "-c", code], timeout=30, result_file=result)
    assert r["status"] == "failed" and r["result"] == {"rows": [1]} and "boom" in r["error"]
    ok = run_json([sys.executable, "-c", "print('noise'); print('{\"a\": 1}')"], timeout=30)
    assert ok["status"] == "ok" and ok["result"] == {"a": 1}


def test_render_writes_every_part_table_and_marks_missed_targets():
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "torch": "2.11", "cpu_cores": 16}
    pretrain = {"part": "pretrain", "title": "1. Pretraining throughput", "status": "ok", "meta": meta, "rows": [
        {"arch": "vit_small_patch16_224", "batch": 256, "measurement": "end to end", "mode": "eager",
         "images_per_s": 2100.0, "vs_main_dino": 3.0, "gflop_per_image": 120.0, "mfu": 0.25, "peak_gib": 30.0}],
        "targets": [device_suite.target("end to end >= 4x main_dino.py", 3.0, 4.0, unit="x")], "cases": []}
    extract = {"part": "extract", "status": "partial", "meta": meta, "rows": [
        {"impl": "peer", "dtype": "float32", "size": 896, "bin": False, "status": "oom", "gpu_peak_mb": 70000}],
        "cases": [{"case": "extract peer 896 px", "status": "timeout", "seconds": 45, "error": "killed"}]}
    analyses = {"part": "analyses", "status": "ok", "meta": meta, "rows": [
        {"task": "video", "impl": "vitdense", "status": "ok", "seconds": 3.0, "fps": 16.0}]}
    text = device_suite.render(pretrain)
    assert "| vit_small_patch16_224 | 256 | end to end | eager | 2100.0 | 3.00x | 120.0 | 25.0% | 30.00 |" in text
    assert "| end to end >= 4x main_dino.py | 3.00x | **no** |" in text and "NVIDIA H100" in text
    text = device_suite.render(extract)
    assert "| 896 | off | – | dino-vit-features | float32 | – | 70000 |" in text and "oom" in text
    assert "extract peer 896 px timeout (45 s)" in text and "killed" in text
    assert "| video | vitdense | 3.00 | 16.00 |" in device_suite.render(analyses)
    summary = device_suite.summary([pretrain, extract, analyses], 100, 480)
    assert summary.startswith("# vitdense device suite") and "All targets" in summary


@pytest.mark.slow
def test_toy_extract_part_writes_its_files(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path), "--toy", "--parts", "extract",
                           "--no-peers"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extract.json", "extract.md", "summary.md"]
    data = json.loads((tmp_path / "extract.json").read_text())
    assert data["status"] == "ok" and data["toy"] is True
    assert {"device", "date", "torch"} <= set(data["meta"])
    sizes = device_suite.plan(True)["extract"]["sizes"]
    cases = {(r["size"], r["bin"], r["dtype"]) for r in data["rows"] if r["impl"] == "ours"}
    assert cases == {(z, b, d) for z in sizes for b in (False, True) for d in ("float32", "bfloat16")}
    # chelsea (300x451) with its shorter side at 32, 48, 64 px → width 48, 72, 96; patch 8, stride 4
    tokens = {32: 7 * 11, 48: 11 * 17, 64: 15 * 23}
    for r in data["rows"]:
        assert r["status"] == "ok" and r["tokens"] == tokens[r["size"]], r
        assert r["images_per_s"] == pytest.approx(1 / np.median(r["seconds"])), r
    assert "| size | bin | tokens |" in (tmp_path / "extract.md").read_text()
    assert "## 2. Extraction" in proc.stdout
