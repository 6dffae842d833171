"""Pretraining that stops on the clock (``--time-limit``), the fitted schedules, and decoding a data set that
is larger than the open-file limit."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain import PretrainConfig, train
from pretrain.schedules import Schedules
from pretrain.train import RunClock

from test_pretrain_run import TINY, photo_dir  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def test_fitted_schedules_keep_the_warmup_fractions_and_end_at_the_final_values():
    cfg = PretrainConfig(epochs=100, warmup_epochs=10, warmup_teacher_temp_epochs=30, batch_size=256, lr=0.001,
                         min_lr=1e-6)
    full = Schedules.from_config(cfg, steps_per_epoch=10)  # 1000 steps
    short = full.fitted(200)
    assert (short.total_steps, short.lr_warmup_steps, short.temp_warmup_steps) == (200, 20, 60)
    # the fitted curve at step s is the full curve at step 5 s (same shape, 5x shorter)
    for s in (0, 7, 20, 63, 150, 199):
        a, b = short.at(s), full.at(5 * s)
        assert a.lr == pytest.approx(b.lr) and a.momentum == pytest.approx(b.momentum)
        assert a.teacher_temp == pytest.approx(b.teacher_temp)
    end = short.at(200)
    assert end.lr == pytest.approx(cfg.min_lr) and end.momentum == pytest.approx(cfg.momentum_teacher_end)


def test_run_clock_plans_from_the_median_step_and_stops_before_the_save():
    clock = RunClock(limit=100.0, start=time.perf_counter(), save_estimate=10.0)
    for _ in range(RunClock.WARM):
        clock.durations.append(5.0)  # slow first steps (compilation) are left out of the median
    assert clock.plan(3) is None
    clock.durations += [0.5] * RunClock.MEASURE
    last = clock.plan(11)
    usable = (clock.left() - 10.0) * (1 - RunClock.MARGIN)
    assert last == pytest.approx(11 + usable / 0.5, abs=2)
    assert clock.plan(12) is None  # planned once
    assert not clock.must_stop()
    clock.start -= 100.0 - 10.5  # 10.5 s left: the save (10 s) and 1.5 steps (0.75 s) no longer fit
    assert clock.must_stop()


class FakeTime:
    """pretrain.train's clock, advancing ``tick`` seconds per reading: the run is the same on a busy machine."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_time_limited_run_stops_on_the_clock_with_a_usable_export(photo_dir, tmp_path, monkeypatch):  # noqa: F811
    train_module = sys.modules["pretrain.train"]
    from vitdense import ViTExtractor

    fake = FakeTime(tick=0.05)
    monkeypatch.setattr(train_module, "time", fake)
    limit = 10.0
    # the configured horizon (20 epochs of 24 steps, warm-up 10 %) is longer than the clock allows
    cfg = PretrainConfig(data_dir=str(photo_dir), out=str(tmp_path / "run"), **TINY, batch_size=4, epochs=20,
                         warmup_epochs=2, repeat=4, time_limit=limit, save_every_epochs=1000)
    result = train(cfg)
    assert fake.now <= limit  # the final save included
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    planned = [r["planned_steps"] for r in records if "planned_steps" in r]
    assert len(planned) == 1 and RunClock.WARM + RunClock.MEASURE < planned[0] < 20 * 24
    assert result.steps <= planned[0]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1))
    # the schedules were fitted to the planned steps: the last steps' learning rate is the fitted curve's, near
    # --min-lr, where the configured 480-step horizon would still be warming up
    fitted = Schedules.from_config(cfg, 24).fitted(planned[0])
    unfitted = Schedules.from_config(cfg, 24)
    last = steps[-1]
    assert last["lr"] == pytest.approx(fitted.at(last["step"] - 1).lr)
    assert last["lr"] < 0.25 * unfitted.at(last["step"] - 1).lr
    ext = ViTExtractor(weights=result.export, stride=8, device="cpu")
    assert ext.model is not None


FD_SCRIPT = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
import torch
from pretrain.data import ImageFolderDataset, MultiCropAugmentation, ResidentSources, find_images
paths = find_images(sys.argv[1])
sources = ResidentSources(ImageFolderDataset(paths, MultiCropAugmentation(32, 16, 2), source_size=48),
                          torch.device("cpu"), workers=2)
print(len(sources.images), len(sources.failed), tuple(sources.images.shape))
"""


def test_resident_decoding_of_more_images_than_open_files(tmp_path):
    """Every decoded image used to keep a shared-memory descriptor open until all were decoded."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(160):
        h, w = (24, 40) if i % 2 else (40, 24)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "bad.png").write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "-c", FD_SCRIPT, str(folder)], capture_output=True, text=True,
                       cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:2] == ["160", "1"]
    assert r.stdout.strip().endswith("(160, 3, 40, 40)")
