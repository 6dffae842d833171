"""Images for DINO: a folder data set, the multi-crop augmentation, and the per-step batch order.

Every random choice of the augmentation is drawn from a ``random.Random`` seeded by (run seed, epoch,
image index), never from global state. So an image gets the same crops whichever process or data-loader
worker loads it, a run resumed at step s sees exactly the batches the uninterrupted run saw, and one
process with a global batch of 2B sees what two processes with B each see.

Shapes: crops are (3, S, S) float tensors normalised with the ImageNet mean/std, S the crop side.
"""
from __future__ import annotations

import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info

from vitdense.backbones import IMAGENET_MEAN, IMAGENET_STD
from vitdense.errors import DataError
from vitdense.io import IMAGE_SUFFIXES, natural_key, to_rgb

if TYPE_CHECKING:
    from .composite import Composer

LOG = logging.getLogger("pretrain")


# --------------------------------------------------------------------------------------------------
# Multi-crop augmentation
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropParams:
    """Every random choice for one view of one image."""

    box: tuple[int, int, int, int]  # top, left, height, width in the source image
    size: int  # output side in pixels
    flip: bool
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue; None = off
    jitter_order: tuple[int, ...]  # order in which the four jitter operations are applied
    grayscale: bool
    blur_radius: float | None  # Gaussian blur radius in pixels; None = no blur
    solarize: bool


def sample_box(rng: random.Random, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Random-resized-crop box (top, left, h, w): area fraction in ``scale``, log-uniform aspect ratio.

    Ten tries at a box that fits, then the largest centred box with a clamped aspect ratio (the
    Inception-style crop that torchvision's RandomResizedCrop also uses).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCropAugmentation:
    """DINO's multi-crop views of one image (Caron et al. 2021, Sec. 3.1 and ``DataAugmentationDINO``).

    Two global views (``global_size``, area ``global_scale``) and ``local_crops`` local views
    (``local_size``, area ``local_scale``). Each view: random resized crop (bicubic), horizontal flip
    (p 0.5), colour jitter 0.4/0.4/0.2/0.1 (p 0.8), grayscale (p 0.2), Gaussian blur with radius in
    [0.1, 2] (p 1.0 on the first global view, 0.1 on the second, 0.5 on local views), solarisation
    (p 0.2, second global view only) -- the BYOL augmentations DINO adopts.

    ``__call__(image, rng)`` → list of 2 + ``local_crops`` tensors: (3, global_size, global_size) twice,
    then (3, local_size, local_size).
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, local_crops: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
                 blur_radius: tuple[float, float] = (0.1, 2.0), solarize_p: float = 0.2,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.global_size, self.local_size, self.local_crops = global_size, local_size, local_crops
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.jitter, self.jitter_p, self.grayscale_p = jitter, jitter_p, grayscale_p
        self.blur_p, self.blur_radius, self.solarize_p = blur_p, blur_radius, solarize_p
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops

    def min_source_side(self) -> int:
        """Shorter image side below which even the smallest crops would be upsampled (JPEG draft target)."""
        side_global = self.global_size / math.sqrt(self.global_scale[0])
        side_local = self.local_size / math.sqrt(self.local_scale[0]) if self.local_crops else 0
        return int(math.ceil(max(side_global, side_local)))

    def sample_params(self, rng: random.Random, height: int, width: int) -> list[CropParams]:
        """The random choices of all views of an (height, width) image, in view order."""
        views = [(self.global_size, self.global_scale, self.blur_p[0], 0.0),
                 (self.global_size, self.global_scale, self.blur_p[1], self.solarize_p)]
        views += [(self.local_size, self.local_scale, self.blur_p[2], 0.0)] * self.local_crops
        params = []
        for size, scale, blur_p, solarize_p in views:
            box = sample_box(rng, height, width, scale)
            flip = rng.random() < 0.5
            jitter = None
            order = (0, 1, 2, 3)
            if rng.random() < self.jitter_p:
                b, c, s, h = self.jitter
                jitter = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                          rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
                order = tuple(rng.sample(range(4), 4))
            grayscale = rng.random() < self.grayscale_p
            blur = rng.uniform(*self.blur_radius) if rng.random() < blur_p else None
            solarize = rng.random() < solarize_p
            params.append(CropParams(box, size, flip, jitter, order, grayscale, blur, solarize))
        return params

    def apply(self, image: Image.Image, p: CropParams) -> torch.Tensor:
        """One view of an RGB PIL image → (3, size, size) normalised tensor."""
        top, left, h, w = p.box
        view = image.crop((left, top, left + w, top + h)).resize((p.size, p.size), Image.BICUBIC)
        if p.flip:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        if p.jitter is not None:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for k in p.jitter_order:
                view = ops[k](view, p.jitter[k])
        if p.grayscale:
            view = view.convert("L").convert("RGB")
        if p.blur_radius is not None:
            view = view.filter(ImageFilter.GaussianBlur(radius=p.blur_radius))
        if p.solarize:
            view = ImageOps.solarize(view, threshold=128)
        arr = chw_uint8(view).float().div_(255)
        return (arr - self.mean) / self.std

    def __call__(self, image: Image.Image, rng: random.Random) -> list[torch.Tensor]:
        return [self.apply(image, p) for p in self.sample_params(rng, image.height, image.width)]


# --------------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------------

# What PIL raises for a file that is not a readable image (or is truncated).
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def chw_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, h, w) uint8 tensor of its own memory."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files anywhere under ``folder`` (by suffix), naturally sorted; DataError when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found" if not folder.exists() else f"{folder}: not a folder")
    images = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                     and not p.name.startswith(".")), key=natural_key)
    if not images:
        raise DataError(f"{folder}: no image files found ({', '.join(IMAGE_SUFFIXES[:5])}, ...)")
    return images


def readable_images(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Split files into (readable, unreadable) by opening each image's header (cheap: no decoding)."""
    good, bad = [], []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    ok = im.width > 0 and im.height > 0
        except UNREADABLE:
            ok = False
        (good if ok else bad).append(path)
    return good, bad


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch (independent of process and worker)."""
    return (seed * 1_000_003 + epoch) * 1_000_000_007 + index


class ImageFolderDataset(Dataset):
    """Multi-crop views of the images of a folder tree.

    Items are keyed by ``(index, seed)`` pairs (see :class:`StepBatchSampler`); ``repeat`` passes over the
    images make one epoch (index ``i`` is image ``i mod len(paths)``; every pass draws other crops), so a
    small data set still has epochs of a useful length for the schedules and checkpoints.

    An item is ``(views, failed)``, ``failed`` 1 when the image could not be decoded and a neighbouring
    image was used instead (the loop counts these). ``views`` is

    * CPU path (``source_size`` 0): the list of view tensors of :class:`MultiCropAugmentation`;
    * with a ``composer`` (:mod:`pretrain.composite`), an item is a new composite made from its seed with
      probability ``composite_p`` (the rest are the images), at the composer's size;
    * device path (``source_size`` > 0): ``(image, params)``, the image shrunk to at most ``source_size``
      on its longer side as (3, h, w) uint8, and the (V, NPARAM) parameter rows of its views (see
      :mod:`pretrain.gpu_augment`), drawn as the CPU path draws them.
    """

    def __init__(self, paths: Sequence[Path], augment: MultiCropAugmentation, repeat: int = 1,
                 source_size: int = 0, cache_mb: int = 0, composer: "Composer | None" = None,
                 composite_p: float = 0.0):
        self.paths = list(paths)
        # with a composer, a share composite_p of the items is a new composite instead of their image
        self.composer, self.composite_p = composer, composite_p
        self.augment = augment
        self.repeat = repeat
        self.source_size = source_size
        self.draft_side = augment.min_source_side()
        # Decoded images kept by each worker process (first come, up to cache_mb): a small data set is
        # decoded once per worker instead of once per view set.
        self.cache_bytes = cache_mb * 2**20
        self.cache: dict[int, Image.Image] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def load(self, path: Path) -> Image.Image:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                # JPEG: decode at a reduced scale when the image is much larger than any crop needs.
                need = self.source_size * min(im.size) / max(im.size) if self.source_size else self.draft_side
                scale = need / max(1, min(im.size))
                if im.format == "JPEG" and scale < 0.5:
                    im.draft("RGB", (int(im.width * scale) + 1, int(im.height * scale) + 1))
                return to_rgb(im)

    def source(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """((3, h, w) uint8 source, view parameter rows) for the device path; ``image`` is already shrunk to
        at most ``source_size`` by :meth:`cached_load`. :func:`collate_crops` pads the sources of a batch."""
        from .gpu_augment import params_to_tensor

        return chw_uint8(image), params_to_tensor(self.augment.sample_params(rng, image.height, image.width))

    def cached_load(self, i: int) -> Image.Image:
        image = self.cache.get(i)
        if image is None:
            image = self.load(self.paths[i])
            if self.source_size and max(image.size) > self.source_size:  # keep what the device path uses
                scale = self.source_size / max(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.BICUBIC, reducing_gap=2.0)
            size = image.width * image.height * 3
            if self.cached_bytes + size <= self.cache_bytes:
                self.cache[i] = image
                self.cached_bytes += size
        return image

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor], int]:
        index, seed = key
        if self.composer is not None:
            draw = np.random.default_rng([seed, 1])  # the composite's own stream: the views keep theirs
            if draw.random() < self.composite_p:
                image = self.composer.make(draw)
                rng = random.Random(seed)
                return (self.source(image, rng) if self.source_size else self.augment(image, rng)), 0
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                image = self.cached_load(i)
            except UNREADABLE as err:
                LOG.debug("skipping unreadable %s (%s)", self.paths[i], err)
                continue
            rng = random.Random(seed)
            views = self.source(image, rng) if self.source_size else self.augment(image, rng)
            return views, int(attempt > 0)
        raise DataError("no readable image left in the data set")


class _DecodeSources(Dataset):
    """Image i of a folder data set as its shrunk device-path source (3, h, w) uint8, or None if unreadable."""

    def __init__(self, dataset: ImageFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.paths)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            image = self.dataset.cached_load(i)
        except UNREADABLE as err:
            LOG.debug("skipping unreadable %s (%s)", self.dataset.paths[i], err)
            return None
        return chw_uint8(image)


class ResidentSources(Dataset):
    """Every source image of a small data set, decoded once and kept on the device (the device-crop path
    without per-step decoding or host-to-device image copies).

    Holds ``images`` (N, 3, H, W) uint8 on ``device`` (zero-padded, each at the top left) and ``sizes``
    (N, 2) = (h, w). As a data set it gives, per ``(index, seed)`` key, ``((i, params), 0)``: the source
    index and the view parameter rows drawn exactly as :meth:`ImageFolderDataset.source` draws them, so both
    paths make the same crops. ``failed`` lists the files that could not be decoded (left out).
    """

    def __init__(self, dataset: ImageFolderDataset, device: torch.device, workers: int = 0):
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        assert dataset.source_size > 0, "resident sources are the device-crop path's"
        self.augment, self.repeat = dataset.augment, dataset.repeat
        # Each decoded image goes to its slot at once and its loader tensor is dropped: a worker hands images
        # over in shared memory, one open file descriptor each, so holding all of them until the end runs out
        # of descriptors (1,337 images at `ulimit -n 1024`).
        side = dataset.source_size
        images = torch.zeros(len(dataset.paths), 3, side, side, dtype=torch.uint8, device=device)
        sizes, kept, self.failed = [], [], []
        loader = DataLoader(_DecodeSources(dataset), batch_size=16, num_workers=workers, collate_fn=list)
        index = 0
        with tqdm(total=len(dataset.paths), desc="decoding images", unit="img", leave=False) as progress:
            for batch in loader:
                for source in batch:
                    if source is None:
                        self.failed.append(dataset.paths[index])
                    else:
                        h, w = source.shape[1:]
                        images[len(kept), :, :h, :w] = source.to(device)
                        sizes.append((h, w))
                        kept.append(index)
                    index += 1
                del batch
                progress.update(index - progress.n)
        if not kept:
            raise DataError("no readable image left in the data set")
        self.sizes = torch.tensor(sizes)
        height, width = self.sizes.max(dim=0).values.tolist()
        # the padding no image reaches is cut off (a view would keep the whole buffer alive)
        self.images = images[:len(kept), :, :height, :width].clone() if (len(kept), height, width) != \
            (len(images), side, side) else images
        del images

    @staticmethod
    def nbytes(num_images: int, source_size: int) -> int:
        """Device memory the sources of ``num_images`` images take at most."""
        return num_images * 3 * source_size * source_size

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, torch.Tensor], int]:
        from .gpu_augment import params_to_tensor

        index, seed = key
        i = index % len(self.images)
        height, width = self.sizes[i].tolist()
        return (i, params_to_tensor(self.augment.sample_params(random.Random(seed), height, width))), 0

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The (B, 3, H, W) uint8 sources of a batch's indices, on the device."""
        return self.images[indices.to(self.images.device, non_blocking=True)]


class StepBatchSampler:
    """Per-process batches of ``(index, seed)`` keys, one per global step, resumable mid-epoch.

    Epoch e shuffles all indices with a generator seeded by (seed, e), keeps ``steps_per_epoch *
    global_batch`` of them and gives global step s the slice ``[s * global_batch, (s + 1) * global_batch)``;
    process r of R takes every R-th key of that slice. ``set_epoch(e, start_step)`` skips steps already
    done (resume) without loading their images.
    """

    def __init__(self, num_images: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        assert global_batch % world_size == 0, (global_batch, world_size)
        self.num_images, self.global_batch = num_images, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = num_images // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_images, generator=gen).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = order[step * self.global_batch:(step + 1) * self.global_batch]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk[self.rank::self.world_size]]


def _batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when made in a loader worker: the batch then reaches the
    main process without being copied again (as torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors, out=_batch_tensor((len(tensors), *tensors[0].shape), tensors[0].dtype))


def collate_crops(items: list[tuple]) -> tuple[list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor], int]:
    """Stack items across images → (views, number of substituted images).

    CPU path: views = list of V tensors (B, 3, S, S). Device path: views = (images (B, 3, H, W) uint8,
    params (B, V, NPARAM)), each source at the top left of its slot, zero-padded to the largest height and
    width in the batch. Resident sources: views = (source indices (B,), params (B, V, NPARAM)).
    """
    failed = sum(item[1] for item in items)
    first = items[0][0]
    if isinstance(first, tuple) and isinstance(first[0], int):  # ResidentSources: (source index, params)
        return (torch.tensor([item[0][0] for item in items]), _stack([item[0][1] for item in items])), failed
    if isinstance(first, tuple):
        sources = [item[0][0] for item in items]
        height, width = max(s.shape[1] for s in sources), max(s.shape[2] for s in sources)
        images = _batch_tensor((len(sources), 3, height, width), torch.uint8).zero_()
        for slot, src in zip(images, sources):
            slot[:, :src.shape[1], :src.shape[2]] = src
        return (images, _stack([item[0][1] for item in items])), failed
    return [_stack([item[0][v] for item in items]) for v in range(len(first))], failed


# --------------------------------------------------------------------------------------------------
# Labelled folder (k-NN evaluation)
# --------------------------------------------------------------------------------------------------

@dataclass
class LabelledSplit:
    paths: list[Path]
    labels: list[int]


def labelled_folder(folder: str | os.PathLike) -> tuple[LabelledSplit, LabelledSplit | None, list[str]]:
    """(train split, val split or None, class names) of a folder with one subfolder per class.

    With ``train/`` and ``val/`` subfolders those are the splits (classes = subfolders of ``train/``);
    otherwise every class subfolder is one split and the evaluation is leave-one-out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: k-NN folder not found")

    def split(root: Path, classes: list[str]) -> LabelledSplit:
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = [p for p in sorted((root / name).rglob("*"), key=natural_key)
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES] if (root / name).is_dir() else []
            paths += files
            labels += [label] * len(files)
        return LabelledSplit(paths, labels)

    if (folder / "train").is_dir() and (folder / "val").is_dir():
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        train, val = split(folder / "train", classes), split(folder / "val", classes)
    else:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        train, val = split(folder, classes), None
    if len(classes) < 2 or not train.paths or (val is not None and not val.paths):
        raise DataError(f"{folder}: k-NN evaluation needs at least two class subfolders with images")
    return train, val, classes
