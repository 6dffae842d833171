"""The ``vitdense`` command line: parse options, call library functions, write files. No algorithms here.

User errors (:class:`VitdenseError`) print one line ``vitdense: error: ...`` and exit with code 2.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import ConfigError, VitdenseError

# Only click and the standard library are imported at start-up: torch, timm and numpy are imported inside
# the commands that need them, so `vitdense --help`, `vitdense models` and option errors answer at once.

LOG = logging.getLogger("vitdense")


class VitdenseGroup(click.Group):
    """Click group that turns VitdenseError (and a missing optional package) into one line + exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VitdenseError as err:
            click.echo(f"vitdense: error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("vitdense: interrupted", err=True)
            sys.exit(130)


@click.group(cls=VitdenseGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitdense")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """Dense visual analysis with self-supervised ViT (DINO) features.

    Every command takes --model/--weights to choose the backbone (default: auto, the official DINO ViT-S/8
    when cached or downloadable, else the bundled vitdense_vits8).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Log lines (warnings) go through tqdm while a progress bar is shown, so they get a line of their own.
    click.get_current_context().with_resource(logging_redirect_tqdm())


# ---------------------------------------------------------------------------------- shared options

def extractor_options(stride: int = 4, layer: int | None = 11, facet: str | None = "key",
                      load_size: int | None = 224) -> Callable:
    """Decorator adding the backbone/extractor options every analysis command shares.

    The decorated command receives them as keyword arguments (model, weights, device, dtype, stride,
    load_size, and layer/facet unless passed None here); give them to :func:`build_extractor`.
    """
    def decorate(fn: Callable) -> Callable:
        opts = [
            click.option("--model", default="auto", show_default=True,
                         help="Backbone name (see `vitdense models`). auto: the official DINO ViT-S/8 when "
                              "cached or downloadable, else the bundled vitdense_vits8; with --weights, the "
                              "file's own architecture."),
            click.option("--weights", type=click.Path(dir_okay=False), default=None,
                         help="Local weights file: official DINO .pth, our pretrain export, or .safetensors."),
            click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
            click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                         show_default=True, help="Precision of the forward pass."),
            click.option("--stride", type=int, default=stride, callback=_positive("--stride"),
                         show_default=True if stride is not None else "the patch size",
                         help="Patch-embedding stride (divides the patch size); smaller = denser."),
            click.option("--load-size", type=int, default=load_size, show_default=True,
                         callback=_positive("--load-size", zero="keep the size"),
                         help="Resize so the shorter side has this many pixels (0 = keep size)."),
        ]
        if layer is not None:
            opts.append(click.option("--layer", type=int, default=layer, show_default=True,
                                     help="Transformer layer (0-based, negative counts from the end)."))
        if facet is not None:
            opts.append(click.option("--facet", type=click.Choice(["key", "query", "value", "token"]),
                                     default=facet, show_default=True, help="Descriptor facet."))
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def _positive(option: str, zero: str | None = None) -> Callable:
    """Click callback: ConfigError (one line, exit 2) unless the value is positive (or 0 when ``zero`` says
    what 0 means); None passes."""
    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is None or value > 0 or (value == 0 and zero):
            return value
        allowed = f"a positive number, or 0 to {zero}" if zero else "a positive number"
        raise ConfigError(f"{option} {value}: must be {allowed}")

    return check


def build_extractor(model: str | None, weights: str | None, device: str, dtype: str, stride: int, **_: Any):
    """A ViTExtractor from the shared options; with ``--model auto`` one line on stderr says which weights
    were used and why."""
    import torch

    import warnings

    from .errors import WeakWeightsWarning
    from .extractor import ViTExtractor

    if weights is not None and not Path(weights).is_file():
        raise VitdenseError(f"{weights}: weights file not found")
    with warnings.catch_warnings():  # the line below says it, for a person at a terminal
        warnings.simplefilter("ignore", WeakWeightsWarning)
        extractor = ViTExtractor(model_type=model, stride=stride, device=device, weights=weights,
                                 dtype=getattr(torch, dtype))
    if extractor.weights_note:
        click.echo(f"weights: {extractor.weights_used}: {extractor.weights_note}", err=True)
    return extractor


def load_size_arg(load_size: int | None) -> int | None:
    return None if not load_size else load_size


# ---------------------------------------------------------------------------------- commands

@main.command()
def models() -> None:
    """List known backbone names and where each gets its weights."""
    from .backbones import AUTO, AUTO_PREFERRED, MODELS, bundled_model_name

    width = max(len(n) for n in MODELS)
    fallback = bundled_model_name()
    click.echo(f"* {AUTO:<{width}}  {AUTO_PREFERRED} from the local model cache or the hub (downloaded once)"
               + (f", else {fallback} (bundled, offline)" if fallback else ""))
    for name, spec in MODELS.items():
        click.echo(f"  {name:<{width}}  {spec.arch:<32} {spec.source}")
    click.echo("\n* = default. Any timm ViT name also works; --weights FILE loads official DINO/DINOv2 files "
               "and vitdense pretrain exports (architecture read from the file). HF_HUB_OFFLINE=1 or "
               "VITDENSE_OFFLINE=1 keeps auto off the network.")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(dir_okay=False), default="features.npz", show_default=True,
              help="NPZ file to write.")
@click.option("--bin/--no-bin", "use_bin", default=False, show_default=True, help="Log-binned descriptors.")
@click.option("--saliency/--no-saliency", default=True, show_default=True, help="Also store saliency maps.")
@extractor_options()
def extract(images: tuple[str, ...], out: str, use_bin: bool, saliency: bool, layer: int, facet: str,
            **opts: Any) -> None:
    """Extract dense descriptors of IMAGES (files or folders) into one NPZ.

    For image number i the NPZ holds desc_i (T, D) float16, saliency_i (T,), grid_i (h, w), and
    paths/load_sizes for all images.
    """
    import numpy as np
    from tqdm import tqdm

    from .io import expand_inputs, record_path, save_npz

    paths = expand_inputs(images)
    extractor = build_extractor(**opts)
    extractor.layer_index(layer)  # fail before any work
    arrays: dict[str, Any] = {}
    for i, path in enumerate(tqdm(paths, desc="extract", unit="img", disable=len(paths) < 2)):
        batch, _ = extractor.preprocess(path, load_size_arg(opts["load_size"]))
        feats = extractor.extract(batch, [layer], facet, bin=use_bin,
                                  saliency=saliency and extractor.has_cls)
        arrays[f"desc_{i}"] = feats.descriptors[layer][0].cpu().numpy().astype(np.float16)
        if feats.saliency is not None:
            arrays[f"saliency_{i}"] = feats.saliency[0].cpu().numpy()
        arrays[f"grid_{i}"] = np.array(feats.num_patches)
        arrays[f"load_size_{i}"] = np.array(feats.load_size)
    arrays["paths"] = np.array([record_path(p) for p in paths])
    arrays["settings"] = np.array(f"model={extractor.model_type} layer={layer} facet={facet} bin={use_bin} "
                                  f"stride={extractor.stride[0]}")
    arrays["weights"] = np.array(extractor.weights_used)
    save_npz(out, **arrays)
    click.echo(f"wrote {out}: {len(paths)} image(s), descriptor dim {arrays['desc_0'].shape[1]}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="pca_out", show_default=True)
@click.option("--together/--separately", default=True, show_default=True,
              help="Fit one PCA over all images (colours comparable) or one per image.")
@click.option("--salient-only", is_flag=True, help="Fit the PCA on salient tokens only (saliency > 0.1).")
@extractor_options(layer=11, facet="key")
def pca(images: tuple[str, ...], out_dir: str, together: bool, salient_only: bool, layer: int, facet: str,
        **opts: Any) -> None:
    """Render the first three principal components of the descriptors as RGB, one PNG per image.

    Each token's colour fills its patch-grid cell (nearest-neighbour upsampling to the resized image).
    """
    from tqdm import tqdm

    from .io import expand_inputs, save_png
    from .viz import pca_rgb, upsample

    paths = expand_inputs(images)
    extractor = build_extractor(**opts)
    extractor.layer_index(layer)  # fail before any work
    descs, grids, masks, sizes = [], [], [], []
    for path in tqdm(paths, desc="extract", unit="img", disable=len(paths) < 2):
        batch, pil = extractor.preprocess(path, load_size_arg(opts["load_size"]))
        feats = extractor.extract(batch, [layer], facet, saliency=salient_only)
        descs.append(feats.descriptors[layer][0].cpu())
        grids.append(feats.num_patches)
        sizes.append((pil.height, pil.width))
        masks.append((feats.saliency[0] > 0.1).cpu().numpy() if salient_only else None)
    groups = [list(range(len(paths)))] if together else [[i] for i in range(len(paths))]
    out = Path(out_dir)
    for group in groups:
        rgbs = pca_rgb([descs[i] for i in group], [grids[i] for i in group],
                       masks=[masks[i] for i in group] if salient_only else None)
        for i, rgb in zip(group, rgbs):
            save_png(out / f"{paths[i].stem}_pca.png", upsample(rgb, sizes[i], nearest=True))
    click.echo(f"wrote {len(paths)} PCA image(s) to {out}")




# ---------------------------------------------------------------------------------- analysis commands

def _register_commands() -> None:
    """Import the per-analysis command modules; each adds its commands to :func:`main`."""
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}")


_register_commands()
