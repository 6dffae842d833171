"""`vitdense propagate` and `vitdense eval-davis` end to end: frame folders, video files, DAVIS layout, bad input."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, save_tiny_weights
from test_davis import write_davis
from test_video import synthetic_video
from vitdense.davis import region_similarity

FAST = ["--device", "cpu", "--load-size", "0"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", depth=4)


@pytest.fixture(scope="module")
def video():
    return synthetic_video(n=6)


def write_frames(folder, frames, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"f{i}" for i in range(len(frames))]
    for name, frame in zip(names, frames):
        Image.fromarray(frame).save(folder / f"{name}.png")
    return names


def write_mask(path, mask, palette):
    im = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
    im.putpalette(palette)
    im.save(path)


PALETTE = [0, 0, 0, 10, 200, 30] + [7] * (768 - 6)  # not the default palette: outputs must copy it


def test_propagate_frame_folder(tmp_path, video, weights):
    frames, masks = video
    names = write_frames(tmp_path / "frames", frames)  # f0 ... f5: natural order puts f10 after f9
    write_mask(tmp_path / "first.png", masks[0], PALETTE)
    out = tmp_path / "out"
    result = run_cli("propagate", tmp_path / "frames", "--mask", tmp_path / "first.png", "--out", out,
                 "--weights", weights, *FAST)
    assert result.exit_code == 0, result.output
    for i, name in enumerate(names):
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P" and im.getpalette()[:768] == PALETTE
            labels = np.array(im)
        if i == 0:
            np.testing.assert_array_equal(labels, masks[0])
        else:
            assert region_similarity(masks[i] == 1, labels == 1) > 0.7
    with Image.open(out / "overlay.gif") as gif:
        assert gif.n_frames == len(frames)
    assert (out / "contact_sheet.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["topk"] == 5 and summary["settings"]["neighborhood"] == 12
    assert summary["settings"]["stride"] == 8 and summary["settings"]["facet"] == "token"
    assert summary["settings"]["normalization"] == "reference"  # DINO's video evaluation's colour statistics
    entry = summary["videos"]["frames"]
    assert entry["n_frames"] == 6 and entry["objects"] == [1]
    assert entry["object_pixels_per_frame"][0] == [int(masks[0].sum())]


def test_propagate_video_file(tmp_path, video, weights):
    import cv2

    frames, masks = video
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    write_mask(tmp_path / "first.png", masks[0], PALETTE)
    out = tmp_path / "out"
    result = run_cli("propagate", path, "--mask", tmp_path / "first.png", "--out", out, "--weights", weights,
                 "--no-overlay", "--n-last-frames", 2, "--topk", 3, "--neighborhood", 4, "--temperature", 0.05,
                 "--facet", "key", "--layer", -2, "--normalization", "model", *FAST)
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert (settings["n_last_frames"], settings["topk"], settings["neighborhood"], settings["temperature"],
            settings["facet"], settings["layer"], settings["normalization"]) == (2, 3, 4, 0.05, "key", -2, "model")
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == [f"{i:05d}.png" for i in range(6)]
    assert not (out / "overlay.gif").exists()
    last = np.array(Image.open(out / "00005.png"))
    assert region_similarity(masks[5] == 1, last == 1) > 0.6  # MJPG compression: a little lower


def test_propagate_bad_input(tmp_path, video, weights):
    frames, masks = video
    write_frames(tmp_path / "ok", frames[:3])
    write_mask(tmp_path / "first.png", masks[0], PALETTE)
    out = tmp_path / "out"

    write_frames(tmp_path / "sizes", [frames[0], frames[1][:90]])
    r = run_cli("propagate", tmp_path / "sizes", "--mask", tmp_path / "first.png", "--out", out, "--weights", weights)
    assert_user_error(r, "f1.png", "128x90", "one size")

    r = run_cli("propagate", tmp_path / "ok", "--mask", tmp_path / "nope.png", "--out", out, "--weights", weights)
    assert_user_error(r, "nope.png", "first-frame mask not found")

    write_mask(tmp_path / "small.png", masks[0][:64], PALETTE)
    r = run_cli("propagate", tmp_path / "ok", "--mask", tmp_path / "small.png", "--out", out, "--weights", weights)
    assert_user_error(r, "small.png", "128x64", "128x96")

    Image.fromarray(frames[0]).save(tmp_path / "rgb.png")
    r = run_cli("propagate", tmp_path / "ok", "--mask", tmp_path / "rgb.png", "--out", out, "--weights", weights)
    assert_user_error(r, "rgb.png", "indexed (palette)")

    write_frames(tmp_path / "corrupt", frames[:2])
    (tmp_path / "corrupt" / "f2.png").write_bytes(b"\x89PNG not really")
    r = run_cli("propagate", tmp_path / "corrupt", "--mask", tmp_path / "first.png", "--out", out, "--weights", weights)
    assert_user_error(r, "f2.png")

    (tmp_path / "clip.mp4").write_bytes(b"these bytes are no video")
    r = run_cli("propagate", tmp_path / "clip.mp4", "--mask", tmp_path / "first.png", "--out", out,
                "--weights", weights)
    assert_user_error(r, "clip.mp4", "cannot be read as a video")

    r = run_cli("propagate", tmp_path / "ok", "--out", out, "--weights", weights)
    assert_user_error(r, "--mask")
    r = run_cli("propagate", "--out", out, "--weights", weights)
    assert_user_error(r, "FRAMES", "--davis-root")
    r = run_cli("propagate", tmp_path / "ok", "--mask", tmp_path / "first.png", "--out", out, "--weights", weights,
            "--topk", 0)
    assert_user_error(r, "--topk 0")
    assert not out.exists()  # nothing written by any failed run


def test_propagate_a_cosegment_style_0_255_mask(tmp_path, video, weights):
    """A grayscale 0/255 mask (what cosegment writes) is one object: outputs keep 0/255, the object gets a
    visible colour, the settings name the weights; an all-zero mask is a one-line error."""
    frames, masks = video
    write_frames(tmp_path / "frames", frames[:3])
    Image.fromarray(masks[0] * 255, mode="L").save(tmp_path / "first.png")
    out = tmp_path / "out"
    result = run_cli("propagate", tmp_path / "frames", "--mask", tmp_path / "first.png", "--out", out,
                     "--weights", weights, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos"]["frames"]["objects"] == [255]
    assert summary["settings"]["weights_used"] == str(weights)
    with Image.open(out / "f2.png") as im:
        labels = np.array(im)
        assert tuple(im.getpalette()[3 * 255: 3 * 256]) == (128, 0, 0)  # the first object colour, not cream
    assert set(np.unique(labels)) == {0, 255}
    assert region_similarity(masks[2] == 1, labels == 255) > 0.7

    Image.fromarray(np.zeros_like(masks[0]), mode="L").save(tmp_path / "empty.png")
    r = run_cli("propagate", tmp_path / "frames", "--mask", tmp_path / "empty.png", "--out", tmp_path / "o2",
                "--weights", weights, *FAST)
    assert_user_error(r, "empty.png", "no object")
    assert not (tmp_path / "o2").exists()


def _tagged(path, arr, palette=None):
    """Save ``arr`` as a phone does with orientation 6: the pixels turned counter-clockwise, the tag saying
    to turn them back clockwise."""
    im = Image.fromarray(np.ascontiguousarray(np.rot90(arr, 1)))
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif)


def test_propagate_rotated_photos_and_mask_give_the_upright_result(tmp_path, video, weights):
    """Frames and first-frame mask saved with an EXIF orientation tag are read upright, both of them: the
    labels of frame 0 and the propagated labels are those of the upright pair. A mask without the tag
    beside tagged frames is a one-line error naming the mask."""
    from PIL import ImageOps

    frames, masks = video
    frames = frames[:3]
    write_frames(tmp_path / "upright", frames)
    write_mask(tmp_path / "upright.png", masks[0], PALETTE)
    (tmp_path / "phone").mkdir()
    for i, frame in enumerate(frames):
        _tagged(tmp_path / "phone" / f"f{i}.png", frame)
    _tagged(tmp_path / "phone.png", masks[0], PALETTE)
    with Image.open(tmp_path / "phone.png") as im:  # the files are what a viewer shows upright
        np.testing.assert_array_equal(np.array(ImageOps.exif_transpose(im)), masks[0])
    outs = {}
    for name in ("upright", "phone"):
        r = run_cli("propagate", tmp_path / name, "--mask", tmp_path / f"{name}.png", "--out", tmp_path / f"o_{name}",
                    "--weights", weights, "--no-overlay", *FAST)
        assert r.exit_code == 0, r.output
        outs[name] = [np.array(Image.open(tmp_path / f"o_{name}" / f"f{i}.png")) for i in range(3)]
    np.testing.assert_array_equal(outs["phone"][0], masks[0])
    for up, phone in zip(outs["upright"], outs["phone"]):
        np.testing.assert_array_equal(phone, up)
    assert region_similarity(masks[2] == 1, outs["phone"][2] == 1) > 0.7

    write_mask(tmp_path / "untagged.png", np.rot90(masks[0], 1), PALETTE)  # the stored pixels, no tag
    r = run_cli("propagate", tmp_path / "phone", "--mask", tmp_path / "untagged.png", "--out", tmp_path / "o3",
                "--weights", weights, *FAST)
    assert_user_error(r, "untagged.png", "mask is 96x128 px", "are 128x96", "orientation")
    assert not (tmp_path / "o3").exists()


def test_davis_root_end_to_end(tmp_path, weights):
    a_frames, a_masks = synthetic_video(n=5, seed=1)
    b_frames, b_masks = synthetic_video(n=4, seed=2, step=-2)
    b_masks = b_masks.copy()
    b_masks[:, 70:90, 90:120] = 2  # a second, static object
    b_frames = b_frames.copy()
    b_frames[:, 70:90, 90:120] = (240, 240, 40)
    write_davis(tmp_path / "DAVIS", {"disk": (a_frames, a_masks), "two": (b_frames, b_masks)})
    out = tmp_path / "results"
    r = run_cli("propagate", "--davis-root", tmp_path / "DAVIS", "--out", out, "--weights", weights, "--evaluate",
            *FAST)
    assert r.exit_code == 0, r.output
    assert "Global results for val" in r.output
    assert sorted(p.name for p in (out / "two").glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert (out / "overlays" / "disk.gif").exists() and (out / "overlays" / "two_sheet.png").exists()
    with open(out / "per-sequence_results-val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["Sequence"] for row in rows] == ["disk_1", "two_1", "two_2"]
    # J-Mean of disk_1 from the written PNGs, frames 1..N-2
    preds = [np.array(Image.open(out / "disk" / f"{i:05d}.png")) for i in range(1, 4)]
    j = np.mean([region_similarity(a_masks[i] == 1, p == 1) for i, p in zip(range(1, 4), preds)])
    assert float(rows[0]["J-Mean"]) == pytest.approx(j, abs=5e-4)
    with open(out / "global_results-val.csv") as f:
        glob = next(csv.DictReader(f))
    jm = np.mean([float(row["J-Mean"]) for row in rows])
    fm = np.mean([float(row["F-Mean"]) for row in rows])
    assert float(glob["J&F-Mean"]) == pytest.approx((jm + fm) / 2, abs=2e-3)
    assert float(glob["J-Mean"]) > 0.6
    first_csv = (out / "global_results-val.csv").read_text()

    (out / "global_results-val.csv").unlink()
    r = run_cli("eval-davis", "--davis-root", tmp_path / "DAVIS", "--results", out)
    assert r.exit_code == 0, r.output
    assert (out / "global_results-val.csv").read_text() == first_csv
    assert json.loads((out / "davis_results-val.json").read_text())["objects"][0]["name"] == "disk_1"

    r = run_cli("propagate", "--davis-root", tmp_path / "DAVIS", "--out", out, "--weights", weights,
            "--sequences", "disk,cat")
    assert_user_error(r, "cat", "val.txt")
    first_two = tmp_path / "DAVIS" / "Annotations" / "480p" / "two" / "00000.png"
    write_mask(first_two, b_masks[0][:80], PALETTE)  # the second sequence's mask has the wrong size
    r = run_cli("propagate", "--davis-root", tmp_path / "DAVIS", "--out", tmp_path / "new", "--weights", weights)
    assert_user_error(r, "two/00000.png", "128x80", "128x96")
    assert not (tmp_path / "new").exists()  # found before the first sequence was segmented
    first_two.unlink()
    r = run_cli("propagate", "--davis-root", tmp_path / "DAVIS", "--out", tmp_path / "new", "--weights", weights)
    assert_user_error(r, "two/00000.png", "not found")
    assert not (tmp_path / "new").exists()  # checked before the first sequence ran


def test_propagate_many_objects_natural_order(tmp_path, weights):
    """Frames 1.png ... 11.png (natural order), a palette mask with ids 2, 5 and 9: every output PNG is named
    after its frame, carries the palette and only those ids, and each object is followed."""
    frames, masks = synthetic_video(n=11, step=2)
    frames, first = frames.copy(), masks[0] * 5
    for obj, (y, x) in ((2, (8, 90)), (9, (70, 8))):
        frames[:, y: y + 16, x: x + 24] = (25 * obj, 230, 255 - 25 * obj)
        first[y: y + 16, x: x + 24] = obj
    names = write_frames(tmp_path / "frames", frames, [str(i) for i in range(1, 12)])
    write_mask(tmp_path / "first.png", first, PALETTE)
    out = tmp_path / "out"
    r = run_cli("propagate", tmp_path / "frames", "--mask", tmp_path / "first.png", "--out", out,
                "--weights", weights, "--no-overlay", *FAST)
    assert r.exit_code == 0, r.output
    entry = json.loads((out / "summary.json").read_text())["videos"]["frames"]
    assert entry["frame_names"] == names and entry["objects"] == [2, 5, 9]
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(names)
    for i, name in enumerate(names):
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P" and im.getpalette()[:768] == PALETTE
            labels = np.array(im)
        assert set(np.unique(labels)) <= {0, 2, 5, 9}
        assert entry["object_pixels_per_frame"][i] == [int((labels == k).sum()) for k in (2, 5, 9)]
        assert region_similarity(masks[i] == 1, labels == 5) > 0.7
        for obj in (2, 9):
            assert region_similarity(first == obj, labels == obj) > 0.6


def test_propagate_interrupted_keeps_finished_frames_and_rerun_equals_an_uninterrupted_run(
        tmp_path, video, weights, monkeypatch):
    import torch

    from vitdense.video import LabelPropagator

    frames, masks = video
    write_frames(tmp_path / "frames", frames)
    write_mask(tmp_path / "first.png", masks[0], PALETTE)
    real_step = LabelPropagator.step
    softs = {}  # run -> soft labels of every propagated frame, in order

    def recording(run, stop_at=None):
        def step(self, features):
            if len(softs.setdefault(run, [])) + 1 == stop_at:
                raise KeyboardInterrupt  # Ctrl-C while the stop_at-th frame after the first is propagated
            soft = real_step(self, features)
            softs[run].append(soft.clone())
            return soft
        monkeypatch.setattr(LabelPropagator, "step", step)

    def propagate(out):  # 2 previous frames of context: the kept ring buffer has wrapped when resuming
        return run_cli("propagate", tmp_path / "frames", "--mask", tmp_path / "first.png", "--out", out,
                       "--weights", weights, "--n-last-frames", 2, *FAST)

    recording("fresh")
    assert propagate(tmp_path / "fresh").exit_code == 0
    out = tmp_path / "out"
    recording("cut", stop_at=4)
    result = propagate(out)
    assert result.exit_code == 130 and "kept 4 finished frame(s)" in result.output, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["f0.png", "f1.png", "f2.png", "f3.png"]
    assert not (out / "summary.json").exists()
    kept = sorted(p.stem for p in (out / ".resume").glob("*.npz"))
    # every finished frame's labels; the propagation state only of the first frame and the 2 last ones
    assert kept == [f"frame-{i:06d}" for i in range(4)] + [f"state-{i:06d}" for i in (0, 2, 3)]
    recording("rest")
    result = propagate(out)
    assert result.exit_code == 0, result.output
    assert "resumed: skipped 4 finished frame(s)" in result.output
    assert len(softs["rest"]) == 2  # only frames 4 and 5 were propagated
    for a, b in zip(softs["rest"], softs["fresh"][3:]):
        assert torch.equal(a, b)  # bit for bit: the restored context is the one the first run had
    assert not (out / ".resume").exists()
    for i in range(6):
        np.testing.assert_array_equal(np.array(Image.open(out / f"f{i}.png")),
                                      np.array(Image.open(tmp_path / "fresh" / f"f{i}.png")))
    summary = json.loads((out / "summary.json").read_text())["videos"]["frames"]
    fresh = json.loads((tmp_path / "fresh" / "summary.json").read_text())["videos"]["frames"]
    assert summary["object_pixels_per_frame"] == fresh["object_pixels_per_frame"]
    assert summary["resumed_frames"] == 4 and summary["frame_names"] == fresh["frame_names"]
    with Image.open(out / "overlay.gif") as gif:
        assert gif.n_frames == 6
    # other options: the kept frames are not reused
    recording("cut2", stop_at=2)
    assert propagate(tmp_path / "other").exit_code == 130
    recording("other")
    result = run_cli("propagate", tmp_path / "frames", "--mask", tmp_path / "first.png", "--out",
                     tmp_path / "other", "--weights", weights, "--n-last-frames", 3, *FAST)
    assert result.exit_code == 0 and "other settings (n_last_frames)" in result.output, result.output
    assert len(softs["other"]) == 5


def test_propagate_rerun_with_fewer_frames_removes_the_previous_runs_extra_files(tmp_path, video, weights):
    frames, masks = video
    write_frames(tmp_path / "long", frames)
    write_frames(tmp_path / "short", frames[:3])
    write_mask(tmp_path / "first.png", masks[0], PALETTE)
    out = tmp_path / "out"
    assert run_cli("propagate", tmp_path / "long", "--mask", tmp_path / "first.png", "--out", out,
                   "--weights", weights, *FAST).exit_code == 0
    (out / "mine.txt").write_text("the user's notes")
    (out / "f9.png").write_bytes((out / "f5.png").read_bytes())  # the user's own copy
    result = run_cli("propagate", tmp_path / "short", "--mask", tmp_path / "first.png", "--out", out,
                     "--weights", weights, "--no-overlay", *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["f0.png", "f1.png", "f2.png", "f9.png", "mine.txt", "summary.json"]


def test_davis_rerun_with_fewer_sequences_removes_the_dropped_ones(tmp_path, weights):
    write_davis(tmp_path / "DAVIS", {"disk": synthetic_video(n=3, seed=1), "ball": synthetic_video(n=3, seed=2),
                                     "cube": synthetic_video(n=2, seed=3)})
    out = tmp_path / "results"
    args = ["propagate", "--davis-root", tmp_path / "DAVIS", "--out", out, "--weights", weights, *FAST]
    assert run_cli(*args).exit_code == 0
    assert (out / "ball" / "00002.png").exists() and (out / "overlays" / "ball.gif").exists()
    assert (out / "cube" / "00001.png").exists()
    (out / "disk" / "notes.txt").write_text("mine")
    (out / "ball" / "notes.txt").write_text("mine")
    result = run_cli(*args, "--sequences", "disk")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "ball").iterdir() if not p.name.startswith(".")) == ["notes.txt"]
    assert sorted(p.name for p in (out / "overlays").iterdir() if not p.name.startswith(".")) == \
        ["disk.gif", "disk_sheet.png"]
    assert (out / "disk" / "notes.txt").exists() and (out / "disk" / "00002.png").exists()
    assert not (out / "cube").exists()  # nothing of the user's in it: the whole folder went


def test_davis_interrupted_in_the_second_sequence_keeps_the_first_finished(tmp_path, weights, monkeypatch):
    from vitdense.video import LabelPropagator

    write_davis(tmp_path / "DAVIS", {"disk": synthetic_video(n=3, seed=1), "ball": synthetic_video(n=3, seed=2)})
    args = ["propagate", "--davis-root", tmp_path / "DAVIS", "--out", tmp_path / "res", "--weights", weights, *FAST]
    real_step, calls = LabelPropagator.step, []

    def step(self, features):
        calls.append(1)
        if len(calls) == 4:  # the second frame after the first of the second sequence
            raise KeyboardInterrupt
        return real_step(self, features)

    monkeypatch.setattr(LabelPropagator, "step", step)
    assert run_cli(*args).exit_code == 130
    calls.clear()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "disk: resumed: skipped 3 finished frame(s)" in result.output
    assert "ball: resumed: skipped 2 finished frame(s)" in result.output and len(calls) == 1
    fresh = tmp_path / "fresh"
    monkeypatch.undo()
    assert run_cli(*args[:4], fresh, *args[5:]).exit_code == 0
    for seq in ("disk", "ball"):
        for i in range(3):
            np.testing.assert_array_equal(np.array(Image.open(tmp_path / "res" / seq / f"{i:05d}.png")),
                                          np.array(Image.open(fresh / seq / f"{i:05d}.png")))
    assert not list((tmp_path / "res").rglob(".resume"))


def test_davis_evaluate_checks_every_annotation_size_before_the_first_sequence(tmp_path, weights):
    """propagate --evaluate reads every annotation afterwards: one of another size than its sequence's first
    is the evaluation's error, found before anything is segmented."""
    frames, masks = synthetic_video(n=5, seed=1)
    write_davis(tmp_path / "DAVIS", {"disk": (frames, masks)})
    write_mask(tmp_path / "DAVIS" / "Annotations" / "480p" / "disk" / "00002.png", masks[2][:80], PALETTE)
    out = tmp_path / "results"
    r = run_cli("propagate", "--davis-root", tmp_path / "DAVIS", "--out", out, "--weights", weights, "--evaluate",
                *FAST)
    assert_user_error(r, "disk", "00002.png", "128x80", "128x96")
    assert not out.exists()
