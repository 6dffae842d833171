"""The evaluation set builder: splits, the .rcc reader, package fetching and the composition, on synthetic
sources (nothing is downloaded)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import keys_of
from vitdense import DataError, is_reserved_stamp, photo_split, stamp_split
from vitdense import evalset
from vitdense.evalset import (Cutout, LabelledPhoto, Origin, Photo, StereoPair, build_eval_set, default_data_dir,
                              fetch_package, load_manifest, read_rcc)

RED_SQUARE = (100, 80, 12)  # x0, y0, side of the red square in every synthetic background
N_FRAMES = 20


def sha_digit(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[0]



# ---------------------------------------------------------------------------------------------------------
# splits


def test_stamp_and_photo_splits_follow_the_sha1_digit():
    for i in range(300):
        key = f"animals/folder{i % 7}/stamp_{i}.png"
        digit = sha_digit(key)
        expected = "reserved" if digit in "0123" else "eval" if digit in "4567" else "train"
        assert stamp_split(key) == expected
        assert is_reserved_stamp(key) == (expected == "reserved")
        assert photo_split(key) == ("eval" if digit in "0123" else "train")
    # the example of the rule's documentation, spelled out
    assert stamp_split("animals/birds/hen.png") == {**{d: "reserved" for d in "0123"}, **{d: "eval" for d in "4567"}
                                                    }.get(sha_digit("animals/birds/hen.png"), "train")
    # all three splits occur
    assert {stamp_split(f"x/{i}.png") for i in range(100)} == {"reserved", "eval", "train"}


def test_pretraining_set_leaves_out_eval_photos_the_motorcycle_and_reserved_stamps():
    from vitdense import select_pretraining  # what apps/build_pretrain_set.py writes goes through it

    prefix = "tuxpaint-stamps-default/usr/share/tuxpaint/stamps/"
    rcc = "gcompris-qt-data/usr/share/gcompris-qt/rcc/erase.rcc/gcompris/src/activities/erase/resource"
    photos = [f"mate-backgrounds/usr/share/backgrounds/mate/nature/p{i}.jpg" for i in range(40)]
    photos += [f"skimage/{name}" for name in ("astronaut", "chelsea", "coffee", "rocket")]
    # every kind of source of the set: photos in Qt bundles and jigzo puzzles, PyPI wheels, Debian pictures
    photos += [f"{rcc}/animal{i}.webp" for i in range(20)]
    photos += [f"jigzo-data/usr/share/games/jigzo/puzzles/00_default/p{i}-3x3.pzl" for i in range(20)]
    photos += [f"gradio/gradio/media_assets/images/p{i}.jpg" for i in range(20)]
    photos += [f"tuxpaint-data/usr/share/tuxpaint/templates/t{i}.jpg" for i in range(20)]
    videos = [f"python3-imageio/usr/share/videos/v{i}.mp4" for i in range(12)]
    frames = [f"{v}#{f}" for v in videos for f in (0, 10, 20)]
    stamps = [f"{prefix}animals/birds/s{i}.png" for i in range(40)]
    keys = photos + ["skimage/motorcycle_left", "skimage/motorcycle_right"] + frames + stamps
    kept = select_pretraining(keys)
    expected = ([k for k in photos if sha_digit(k) not in "0123"]
                + [f for f in frames if sha_digit(f.split("#")[0]) not in "0123"]  # a video goes whole
                + [k for k in stamps if sha_digit(k[len(prefix):]) in "89abcdef"])
    assert kept == expected
    assert not any("motorcycle" in k for k in kept)
    assert not any(sha_digit(k[len(prefix):]) in "01234567" for k in kept if k.startswith(prefix))
    # the list had every kind: eval photos and videos, reserved and eval stamps were there to leave out
    assert any(sha_digit(k) in "0123" for k in photos)
    assert {sha_digit(v) in "0123" for v in videos} == {True, False}
    assert {sha_digit(k[len(prefix):]) in "0123" for k in stamps} == {True, False}


# ---------------------------------------------------------------------------------------------------------
# Qt resource bundles


def write_rcc(path: Path, files: dict[str, tuple[bytes, bool]], version: int) -> None:
    """A tiny .rcc writer, written from the format description: files {"dir/name": (bytes, zlib?)}."""
    tree: dict = {}
    for name, payload in files.items():
        node = tree
        *dirs, leaf = name.split("/")
        for part in dirs:
            node = node.setdefault(part, {})
        node[leaf] = payload
    names, data, nodes = bytearray(), bytearray(), []

    def add_name(text: str) -> int:
        offset = len(names)
        names.extend(struct.pack(">HI", len(text), 0xDEADBEEF) + text.encode("utf-16-be"))
        return offset

    # breadth first: a directory's children are consecutive nodes
    nodes.append(None)
    queue = [(0, tree)]
    while queue:
        index, directory = queue.pop(0)
        first = len(nodes)
        children = sorted(directory.items())
        nodes.extend([None] * len(children))
        nodes[index] = ("dir", nodes[index][1] if nodes[index] else 0, len(children), first)
        for k, (child_name, child) in enumerate(children):
            name_offset = add_name(child_name)
            if isinstance(child, dict):
                nodes[first + k] = ("dir", name_offset, 0, 0)
                queue.append((first + k, child))
            else:
                payload, compress = child
                offset = len(data)
                if compress:
                    packed = struct.pack(">I", len(payload)) + zlib.compress(payload)
                    data.extend(struct.pack(">I", len(packed)) + packed)
                else:
                    data.extend(struct.pack(">I", len(payload)) + payload)
                nodes[first + k] = ("file", name_offset, 1 if compress else 0, offset)
    node_bytes = bytearray()
    for kind, name_offset, a, b in nodes:
        if kind == "dir":
            node_bytes.extend(struct.pack(">IHII", name_offset, 0x02, a, b))
        else:
            node_bytes.extend(struct.pack(">IHHHI", name_offset, a, 0, 0, b))
        if version >= 2:
            node_bytes.extend(struct.pack(">Q", 1234567890))
    header_size = 24 if version >= 3 else 20
    data_offset = header_size
    names_offset = data_offset + len(data)
    tree_offset = names_offset + len(names)
    header = b"qres" + struct.pack(">IIII", version, tree_offset, data_offset, names_offset)
    if version >= 3:
        header += struct.pack(">I", 1)
    path.write_bytes(header + bytes(data) + bytes(names) + bytes(node_bytes))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_read_rcc_reads_plain_and_zlib_files_in_nested_folders(tmp_path, version):
    plain = b"plain text \x00\x01 bytes"
    packed = bytes(range(256)) * 20
    path = tmp_path / "bundle.rcc"
    write_rcc(path, {"top.txt": (plain, False), "gcompris/src/deep/images/b.bin": (packed, True),
                     "gcompris/src/ü.txt": (b"unicode name", False)}, version)
    files = read_rcc(path)
    assert files == {"top.txt": plain, "gcompris/src/deep/images/b.bin": packed, "gcompris/src/ü.txt": b"unicode name"}


def test_read_rcc_rejects_other_files(tmp_path):
    path = tmp_path / "not.rcc"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError, match="not.rcc"):
        read_rcc(path)


# ---------------------------------------------------------------------------------------------------------
# licences, photo criterion, packages


def test_licences_from_readmes_and_copyright_files():
    readme = ("Copyright: Ann\nSource: https://example.org/a.jpg\nLicense: CC0-1.0\nFiles:\na.webp\nb.webp\n\n"
              "Copyright: Bob\nFiles: c.webp\nLicense: CC-BY-SA-4.0\n")
    assert evalset.readme_licences(readme) == {"a.webp": "CC0-1.0 (© Ann)", "b.webp": "CC0-1.0 (© Ann)",
                                               "c.webp": "CC-BY-SA-4.0 (© Bob)"}
    dep5 = ("Files: *\nCopyright: Everyone\nLicense: GPL-2+\n\n"
            "Files: backgrounds/nature/*\nCopyright: Cam\nLicense: CC-BY-SA-3.0\n")
    assert evalset.licence_of(dep5, "usr/share/x/y.png").startswith("GPL-2+")
    assert evalset.licence_of(dep5, "usr/share/backgrounds/nature/d.jpg") == "CC-BY-SA-3.0 (© Cam)"
    assert evalset.is_non_commercial("CC-BY-NC-SA-4.0") and evalset.is_non_commercial("free for non-commercial use")
    assert not evalset.is_non_commercial("CC-BY-SA-4.0") and not evalset.is_non_commercial("GPL-2+")


def test_photo_criterion_tells_noise_from_flat_paint():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:120]
    alpha = (((yy - 60) ** 2 + (xx - 60) ** 2) < 50 ** 2).astype(np.uint8) * 255
    drawing = np.dstack([np.full((120, 120, 3), (200, 40, 40), np.uint8), alpha])
    drawing[40:80, 40:80, :3] = (20, 20, 200)
    photo = drawing.copy()
    smooth = 120 + 40 * np.sin(xx / 9.0)[..., None] + rng.normal(0, 6, (120, 120, 3))
    photo[..., :3] = np.clip(smooth, 0, 255).astype(np.uint8)
    assert not evalset.looks_photographic(drawing)
    assert evalset.looks_photographic(photo)
    assert not evalset.looks_photographic(photo[50:90, 50:90])  # too small: under 64 px


def test_photo_stamp_list_is_sorted_and_holds_no_reserved_stamp():
    listed = evalset.read_photo_stamp_list()
    assert listed == sorted(set(listed)) and len(listed) > 200
    assert not [rel for rel in listed if sha_digit(rel) in "0123"]
    assert all(rel.endswith(".png") and not rel.startswith("/") for rel in listed)


def fake_tools(tmp_path: Path, template: Path) -> Path:
    """apt-get and dpkg-deb stand-ins: the download works once (a second call fails), dpkg-deb copies
    ``template``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f"echo x >> {calls}\n"
        f"if [ $(wc -l < {calls}) -gt 1 ]; then echo 'E: called twice' >&2; exit 100; fi\n"
        'if [ "$2" = "nosuch" ]; then echo "E: Unable to locate package nosuch" >&2; exit 100; fi\n'
        'echo deb > "$2_4%3a1.2-3_all.deb"\n')
    (bin_dir / "dpkg-deb").write_text(f'#!/bin/sh\nmkdir -p "$3" && cp -r {template}/. "$3"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def test_fetch_package_downloads_once_unpacks_and_reads_licences(tmp_path, monkeypatch):
    template = tmp_path / "template"
    (template / "usr/share/doc/walls").mkdir(parents=True)
    (template / "usr/share/doc/walls/copyright").write_text(
        "Files: *\nCopyright: Dee\nLicense: GPL-2+\n\nFiles: nature/*\nCopyright: Eve\nLicense: CC-BY-4.0\n")
    for rel, size in (("usr/share/backgrounds/nature/lake_800x600.jpg", (800, 600)),
                      ("usr/share/backgrounds/nature/lake_1600x1200.jpg", (1600, 1200)),
                      ("usr/share/backgrounds/Hill/contents/images/640x480.jpg", (640, 480)),
                      ("usr/share/backgrounds/Hill/contents/images/1280x960.jpg", (1280, 960))):
        (template / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, "green").save(template / rel)
    monkeypatch.setenv("PATH", f"{fake_tools(tmp_path, template)}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    package = fetch_package("walls", cache, tmp_path / "work1")
    assert package.version == "4:1.2-3" and (cache / "walls_4%3a1.2-3_all.deb").is_file()
    assert package.licence("usr/share/backgrounds/nature/lake_800x600.jpg") == "CC-BY-4.0 (© Eve)"
    assert evalset.wallpaper_photos(package) == ["usr/share/backgrounds/Hill/contents/images/1280x960.jpg",
                                                 "usr/share/backgrounds/nature/lake_1600x1200.jpg"]
    assert [evalset.wallpaper_name(rel) for rel in evalset.wallpaper_photos(package)] == ["Hill", "lake_1600x1200"]
    again = fetch_package("walls", cache, tmp_path / "work2")  # cached: apt-get would fail a second time
    assert again.version == package.version
    with pytest.raises(DataError, match="apt-get download nosuch failed: E: called twice|Unable to locate"):
        fetch_package("nosuch", cache, tmp_path / "work3")


def test_fetch_package_says_what_fails(tmp_path, monkeypatch):
    template = tmp_path / "template"
    template.mkdir()
    monkeypatch.setenv("PATH", f"{fake_tools(tmp_path, template)}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataError, match=r"apt-get download nosuch failed: E: Unable to locate package nosuch"):
        fetch_package("nosuch", tmp_path / "cache", tmp_path / "work")
    assert not list((tmp_path / "cache").glob("*.deb"))
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match="apt-get and dpkg-deb not found"):
        fetch_package("walls", tmp_path / "cache", tmp_path / "work")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VITDENSE_DATA", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"
    monkeypatch.delenv("VITDENSE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "vitdense" / "eval-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "vitdense" / "eval-v1"


# ---------------------------------------------------------------------------------------------------------
# composition on synthetic sources

COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 210), "yellow": (220, 210, 40),
           "odd": (150, 60, 170)}


def shape(kind: str, colour, size: int, rng: np.random.Generator) -> np.ndarray:
    """A disc or square cut-out with a soft edge, a textured fill and a transparent margin."""
    margin = 5
    n = size + 2 * margin
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    c = n / 2
    if kind == "discs":
        inside = size / 2 - np.hypot(yy - c, xx - c)
    else:
        inside = size / 2 - np.maximum(np.abs(yy - c), np.abs(xx - c))
    alpha = np.clip(inside * 128 + 128, 0, 255).astype(np.uint8)  # 2 px soft edge
    fill = np.array(colour, np.float32) + rng.normal(0, 4, (n, n, 3))
    return np.dstack([np.clip(fill, 0, 255).astype(np.uint8), alpha])


def background(rng: np.random.Generator) -> np.ndarray:
    """320x240 grey noise on a gradient (no red anywhere) with a red square at RED_SQUARE."""
    yy, xx = np.mgrid[0:240, 0:320]
    grey = 70 + 0.3 * xx + 0.2 * yy + rng.normal(0, 12, (240, 320))
    rgb = np.repeat(grey[..., None], 3, axis=2) + rng.uniform(-4, 4, (240, 320, 3))
    x0, y0, side = RED_SQUARE
    rgb[y0:y0 + side, x0:x0 + side] = (230, 10, 10)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sources():
    rng = np.random.default_rng(123)
    origin = lambda key: Origin("synthetic-stamps", "1.0", f"stamps/{key}", "CC0-1.0")  # noqa: E731
    cutouts = []
    folders = {"discs/red": 6, "discs/green": 6, "squares/blue": 6, "squares/yellow": 7, "misc/odd": 3}
    for folder, n in folders.items():
        kind, colour = folder.split("/")
        for key in keys_of(folder + "/s{}.png", "eval", n, stamp_split):
            cutouts.append(Cutout(key, folder, shape(kind, COLOURS[colour], int(rng.integers(30, 70)), rng),
                                  origin(key)))
    for folder in ("discs/red", "squares/blue"):  # the k-NN bank
        kind, colour = folder.split("/")
        for key in keys_of(folder + "/t{}.png", "train", 4, stamp_split):
            cutouts.append(Cutout(key, folder, shape(kind, COLOURS[colour], 50, rng), origin(key)))
    reserved = keys_of("discs/red/r{}.png", "reserved", 3, stamp_split)
    for key in reserved:  # white discs that must never show up
        cutouts.append(Cutout(key, "discs/red", shape("discs", (255, 255, 255), 60, rng),
                              Origin("RESERVED-PKG", "0", key, "CC0-1.0")))
    bg_origin = lambda key: Origin("synthetic-photos", "2.0", key, "CC-BY-4.0")  # noqa: E731
    eval_bg = keys_of("synthetic-photos/bg/b{}.png", "eval", 8, photo_split)
    train_bg = keys_of("synthetic-photos/bg/b{}.png", "train", 3, photo_split)
    backgrounds = [Photo(key, background(rng), bg_origin(key)) for key in eval_bg + train_bg]
    labelled = []
    for label, tone in (("alpha", 40), ("beta", 120), ("gamma", 200), ("delta", 90)):
        splits = {"train": 3, "eval": 0 if label == "delta" else 2}
        for split, n in splits.items():
            for key in keys_of(f"synthetic-photos/knn/{label}/{{}}.jpg", split, n, photo_split):
                rgb = np.clip(tone + rng.normal(0, 10, (200, 300, 3)), 0, 255).astype(np.uint8)
                labelled.append(LabelledPhoto("gcompris", label, key, rgb, bg_origin(key)))
    disparity = rng.uniform(5, 20, (60, 80)).astype(np.float32)
    disparity[:5] = np.inf
    stereo = StereoPair(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8),
                        rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), disparity,
                        Origin("scikit-image", "0", "skimage.data.stereo_motorcycle", "Middlebury"))
    return {"cutouts": cutouts, "backgrounds": backgrounds, "labelled": labelled, "stereo": stereo,
            "reserved": reserved, "train_bg": train_bg}


def build(sources, out: Path, seed: int = 0) -> dict:
    return build_eval_set(out, sources["cutouts"], sources["backgrounds"], sources["labelled"], seed=seed,
                          stereo=sources["stereo"], n_frames=N_FRAMES)


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalset") / "eval-v1"
    return out, build(sources, out)


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def recompute_mask(rgba: np.ndarray, box: list[int], shape_hw: tuple[int, int]) -> np.ndarray:
    """Independently: the cut-out's alpha bounding box, resized to the recorded box, thresholded at 128 and
    placed (clipped) on an empty (H, W) canvas."""
    ys, xs = np.nonzero(rgba[..., 3])
    crop = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    x0, y0, x1, y1 = box
    resized = np.asarray(Image.fromarray(crop, "RGBA").resize((x1 - x0, y1 - y0), Image.BICUBIC))
    canvas = np.zeros((shape_hw[0] + 2 * 400, shape_hw[1] + 2 * 400), bool)
    canvas[y0 + 400:y1 + 400, x0 + 400:x1 + 400] = resized[..., 3] >= 128
    return canvas[400:400 + shape_hw[0], 400:400 + shape_hw[1]]


def test_manifest_lists_existing_files_and_loads(built):
    out, manifest = built
    assert manifest == load_manifest(out)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (manifest["format"], manifest["version"], manifest["seed"]) == ("vitdense-eval", 1, 0)
    listed = {s["file"] for s in manifest["sources"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    stamp_files = [s for s in manifest["sources"] if s["file"].startswith("coseg/")]
    assert stamp_files and all(s["from"][0]["package"] == "synthetic-stamps" for s in stamp_files)
    first = manifest["sources"][0]["from"]
    assert {"package", "version", "original", "licence"} == set(first[0])
    assert not list(out.parent.glob(".*partial*"))


def test_coseg_groups_masks_and_composites(built, sources):
    out, manifest = built
    by_key = {c.key: c for c in sources["cutouts"]}
    groups = manifest["coseg"]
    assert sorted(g["group"] for g in groups) == ["discs_green", "discs_red", "squares_blue", "squares_yellow"]
    assert groups[0]["group"] == "squares_yellow"  # the most populous first
    used = [key for g in groups for key in g["stamps"]]
    assert len(used) == len(set(used)) == 24
    for group in groups:
        assert len(group["images"]) == len(group["masks"]) == len(group["stamps"]) == 6
        assert len(set(group["backgrounds"])) == 6
        assert all(photo_split(k) == "eval" for k in group["backgrounds"])
        for image_rel, mask_rel, key, box in zip(group["images"], group["masks"], group["stamps"], group["boxes"]):
            cutout = by_key[key]
            assert stamp_split(key) == "eval" and cutout.category.replace("/", "_") == group["group"]
            image, mask = read(out / image_rel), read(out / mask_rel)
            assert image.shape == (256, 256, 3) and mask.shape == (256, 256) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            assert 0.40 * 256 - 1 <= max(x1 - x0, y1 - y0) <= 0.75 * 256 + 1
            expected = recompute_mask(cutout.rgba, box, (256, 256))
            assert np.array_equal(mask == 255, expected)
            # inside the object the composite shows the cut-out's colour (JPEG aside)
            core = expected.copy()
            core[1:-1, 1:-1] = expected[1:-1, 1:-1] & expected[:-2, 1:-1] & expected[2:, 1:-1]
            colour = np.array(COLOURS[cutout.category.split("/")[1]], np.float32)
            assert np.abs(image[core].astype(np.float32).mean(0) - colour).max() < 12


def test_reserved_and_train_split_inputs_are_never_used(built, sources):
    out, manifest = built
    text = (out / "manifest.json").read_text()
    assert "RESERVED-PKG" not in text
    assert not any(key in text for key in sources["reserved"])
    assert not any(key in text for key in sources["train_bg"])
    # no white disc in any picture: the reserved cut-outs are pure white
    for group in manifest["coseg"]:
        for rel in group["images"]:
            assert (read(out / rel).min(axis=2) > 245).sum() < 20


def test_knn_sets(built, sources):
    out, manifest = built
    labelled = manifest["knn"]["gcompris"]
    assert labelled["classes"] == ["alpha", "beta", "gamma"]  # delta has no query image: dropped
    assert len(labelled["bank"]) == 9 and len(labelled["query"]) == 6
    for part, split in (("bank", "train"), ("query", "eval")):
        for rel, index in labelled[part]:
            assert f"/{part}/{labelled['classes'][index]}/" in rel
            assert read(out / rel).shape == (224, 224, 3)
    tone = {"alpha": 40, "beta": 120, "gamma": 200}
    for rel, index in labelled["query"]:
        assert abs(read(out / rel).mean() - tone[labelled["classes"][index]]) < 4
    stamps = manifest["knn"]["stamps"]
    assert stamps["classes"] == ["discs", "squares"]  # misc: no bank image
    assert len(stamps["bank"]) == 8 and len(stamps["query"]) == 12 + 13
    for rel, index in stamps["bank"] + stamps["query"]:
        image = read(out / rel)
        assert image.shape == (224, 224, 3)
        assert abs(int(image[2, 2].mean()) - 128) <= 3  # the grey surround
        ys, xs = np.nonzero(np.abs(image.astype(int) - 128).max(axis=2) > 40)
        assert 0.7 * 224 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 0.85 * 224  # the object fills ~80 %


def test_pairs_disparity_and_homographies(built, sources):
    out, manifest = built
    pairs = manifest["pairs"]
    assert [p["kind"] for p in pairs] == ["disparity"] + ["homography"] * 6
    stereo = sources["stereo"]
    assert np.array_equal(read(out / pairs[0]["a"]), stereo.left)
    assert np.array_equal(read(out / pairs[0]["b"]), stereo.right)
    disparity = np.load(out / pairs[0]["disparity"])
    assert disparity.dtype == np.float32 and np.array_equal(disparity, stereo.disparity)
    x0, y0, side = RED_SQUARE
    centre = np.array([x0 + (side - 1) / 2, y0 + (side - 1) / 2, 1.0])
    checked = 0
    for pair in pairs[1:]:
        a, b = read(out / pair["a"]).astype(int), read(out / pair["b"]).astype(int)
        assert a.shape == b.shape == (240, 320, 3)
        red_a = (a[..., 0] - a[..., 1:].max(axis=2)) > 80
        assert red_a[y0 + 2:y0 + side - 2, x0 + 2:x0 + side - 2].all() and red_a.sum() < 2 * side * side
        H = np.array(pair["H"])
        u, v, w = H @ centre
        u, v = u / w, v / w
        # at least half of a lands in b
        ys, xs = np.mgrid[0:240, 0:320]
        mapped = H @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
        inside = ((mapped[2] > 0) & (mapped[0] / mapped[2] >= 0) & (mapped[0] / mapped[2] <= 319)
                  & (mapped[1] / mapped[2] >= 0) & (mapped[1] / mapped[2] <= 239))
        assert inside.mean() >= 0.5
        if not (8 <= u <= 311 and 8 <= v <= 231):
            continue
        red_b = (b[..., 0] - b[..., 1:].max(axis=2)) > 60
        ys_b, xs_b = np.nonzero(red_b)
        assert len(xs_b) > 20
        assert abs(xs_b.mean() - u) < 1.5 and abs(ys_b.mean() - v) < 1.5
        checked += 1
    assert checked >= 3


def test_videos_label_the_occluder_in_front(built, sources):
    out, manifest = built
    by_key = {c.key: c for c in sources["cutouts"]}
    grouped = {key for g in manifest["coseg"] for key in g["stamps"]}
    videos = manifest["video"]
    assert [v["name"] for v in videos] == ["v00", "v01"]
    seen = []
    for video in videos:
        assert len(video["frames"]) == len(video["masks"]) == len(video["boxes"]) == N_FRAMES
        assert video["frames"][0] == f"video/{video['name']}/00000.jpg"
        assert photo_split(video["background"]) == "eval"
        obj1, obj2 = (by_key[k] for k in video["stamps"])
        assert stamp_split(obj1.key) == stamp_split(obj2.key) == "eval"
        assert not grouped & set(video["stamps"])  # stamps no co-segmentation group used
        seen += video["stamps"]
        hidden_frames = 0
        for f, (frame_rel, mask_rel, boxes) in enumerate(zip(video["frames"], video["masks"], video["boxes"])):
            with Image.open(out / mask_rel) as im:
                assert im.mode == "P"
                assert im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
                label = np.asarray(im)
            assert read(out / frame_rel).shape == (240, 320, 3) and label.shape == (240, 320)
            mask1 = recompute_mask(obj1.rgba, boxes[0], (240, 320))
            mask2 = recompute_mask(obj2.rgba, boxes[1], (240, 320))
            assert np.array_equal(label == 2, mask2)
            assert np.array_equal(label == 1, mask1 & ~mask2)
            assert set(np.unique(label)) <= {0, 1, 2}
            if f == 0:
                assert (label == 1).sum() > 100 and (label == 2).sum() > 100
            hidden_frames += bool((mask1 & mask2).any())
        assert hidden_frames >= 3
        assert video["occluded_frames"] == sorted(video["occluded_frames"]) and len(video["occluded_frames"]) >= 3
    assert len(set(seen)) == 4


def test_preview_shows_pictures(built):
    out, _ = built
    sheet = read(out / "preview.png")
    assert sheet.ndim == 3 and sheet.shape[0] > 200 and sheet.std() > 20


def test_same_seed_same_bytes_other_seed_other_files(built, sources, tmp_path):
    out, manifest = built
    again = tmp_path / "again"
    build(sources, again, seed=0)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    changed = build(sources, other, seed=1)
    assert changed["coseg"][0]["boxes"] != manifest["coseg"][0]["boxes"]
    assert (other / "coseg/squares_yellow/00.jpg").read_bytes() != (out / "coseg/squares_yellow/00.jpg").read_bytes()
    assert changed["pairs"][1]["H"] != manifest["pairs"][1]["H"]


def test_interrupted_build_leaves_the_old_folder_alone(sources, tmp_path, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("old set")

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(evalset, "homography_pair", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        build(sources, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_too_few_eval_backgrounds_is_a_data_error(sources, tmp_path):
    few = [p for p in sources["backgrounds"] if photo_split(p.key) == "eval"][:3]
    with pytest.raises(DataError, match="eval-split background photos"):
        build_eval_set(tmp_path / "x", sources["cutouts"], few, [], n_frames=4)
    assert not (tmp_path / "x").exists()


def test_load_manifest_errors_name_the_problem(built, tmp_path):
    out, _ = built
    with pytest.raises(DataError, match=rf"{tmp_path / 'absent'}: no evaluation data folder .*--prepare"):
        load_manifest(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json is missing"):
        load_manifest(tmp_path / "empty")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = copy / "video/v01/00003.png"
    victim.unlink()
    with pytest.raises(DataError, match=rf"{copy}: listed file video/v01/00003.png is missing .*--prepare"):
        load_manifest(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"version 2, expected 'vitdense-eval' version 1"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        load_manifest(copy)
