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
    """Click group that turns VitdenseError (and a missing optional package) into one line + exit 2.

    SIGTERM is handled like Ctrl-C (KeyboardInterrupt), so both keep what the commands have finished
    (see "Interrupted runs" in the README); an interrupted command exits 130.
    """

    def invoke(self, ctx: click.Context) -> Any:
        import errno
        import signal
        import threading

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return super().invoke(ctx)
        except VitdenseError as err:
            click.echo(f"vitdense: error: {cli_message(err)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as err:
            click.echo("vitdense: interrupted" + (f": {err}" if str(err) else ""), err=True)
            sys.exit(130)
        except OSError as err:
            # a location that became unwritable (or a full disk) after the up-front check: still one line
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
                raise
            click.echo(f"vitdense: error: {err.filename or 'output'}: {err.strerror}", err=True)
            sys.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cli_message(err: VitdenseError) -> str:
    """The error's message with Python argument names (``facet='nose'``) written as the CLI's flags."""
    return err.cli_message(CLI_FLAGS) if hasattr(err, "cli_message") else str(err)


# Python argument names whose command-line flag is not just the name with dashes.
CLI_FLAGS = {"radius": "--neighborhood", "kmeans_impl": "--kmeans", "rule": "--salient", "m": "--pq-m"}


class OutputPath(click.ParamType):
    """Click type of every ``--out`` (and other written) location: checked by :func:`vitdense.io.check_output`
    when the options are parsed, before the command runs, with one ``PATH: problem`` line on failure."""

    name = "path"

    def __init__(self, folder: bool):
        self.folder = folder

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .io import check_output  # light: numpy and PIL, no torch

        option = max(param.opts, key=len) if param is not None and param.opts else "--out"
        return str(check_output(value, folder=self.folder, option=option))


def warn_skipped(skipped: list, strict_hint: bool = True) -> None:
    """One warning line on stderr naming every skipped (path, reason), capped: the folder commands' rule."""
    from .io import describe_skipped

    if skipped:
        click.echo(f"warning: skipped {len(skipped)} unreadable file(s): {describe_skipped(skipped)}"
                   + (" (--strict stops at the first)" if strict_hint else ""), err=True)


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
        from .errors import cli_terms

        note = cli_terms(extractor.weights_note, CLI_FLAGS, ("weights", "model"))  # the hints as flags
        click.echo(f"weights: {extractor.weights_used}: {note}", err=True)
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
@click.option("--out", "out", type=OutputPath(folder=False), default="features.npz", show_default=True,
              help="NPZ file to write.")
@click.option("--bin/--no-bin", "use_bin", default=False, show_default=True, help="Log-binned descriptors.")
@click.option("--saliency/--no-saliency", default=True, show_default=True, help="Also store saliency maps.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
@extractor_options()
def extract(images: tuple[str, ...], out: str, use_bin: bool, saliency: bool, strict: bool, layer: int, facet: str,
            **opts: Any) -> None:
    """Extract dense descriptors of IMAGES (files or folders) into one NPZ.

    For image number i the NPZ holds desc_i (T, D) float16, saliency_i (T,), grid_i (h, w), and
    paths/load_sizes for all images. Unreadable files are skipped and listed (--strict: stop at the first).
    With several images each finished one is kept in OUT.parts/ until the NPZ is written: an interrupted
    run, run again with the same options, skips them.
    """
    import numpy as np
    from tqdm import tqdm

    from .errors import DataError, ImageError
    from .io import expand_inputs, record_path, save_npz
    from .resume import ResumeStore

    paths = expand_inputs(images)
    extractor = build_extractor(**opts)
    extractor.layer_index(layer)  # fail before any work
    settings = f"model={extractor.model_type} layer={layer} facet={facet} bin={use_bin} stride={extractor.stride[0]}"
    store = ResumeStore(f"{out}.parts", {"settings": settings, "weights": extractor.weights_used,
                                         "load_size": opts["load_size"], "dtype": opts["dtype"],
                                         "saliency": saliency}) if len(paths) > 1 else None
    for line in store.notes() if store is not None else []:
        click.echo(line, err=True)
    arrays: dict[str, Any] = {}
    good: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    try:
        for path in tqdm(paths, desc="extract", unit="img", disable=len(paths) < 2):
            one = store.get(path) if store is not None else None
            if one is None:
                try:
                    batch, _ = extractor.preprocess(path, load_size_arg(opts["load_size"]))
                except ImageError as err:
                    if strict or len(paths) == 1:
                        raise
                    skipped.append((path, str(err).split(": ", 1)[-1]))
                    continue
                feats = extractor.extract(batch, [layer], facet, bin=use_bin,
                                          saliency=saliency and extractor.has_cls)
                one = {"desc": feats.descriptors[layer][0].cpu().numpy().astype(np.float16),
                       "grid": np.array(feats.num_patches), "load_size": np.array(feats.load_size)}
                if feats.saliency is not None:
                    one["saliency"] = feats.saliency[0].cpu().numpy()
                if store is not None:
                    store.put(path, **one)
            i = len(good)
            good.append(path)
            arrays.update({f"{k}_{i}": v for k, v in one.items()})
    except KeyboardInterrupt:
        raise store.interrupted() if store is not None else KeyboardInterrupt() from None
    if store is not None and store.reused:
        click.echo(f"resumed: skipped {store.reused} finished image(s) kept in {store.folder}", err=True)
    warn_skipped(skipped)
    if not good:
        raise DataError(f"none of the {len(paths)} image(s) could be read: {skipped[0][0]}: {skipped[0][1]}")
    arrays["paths"] = np.array([record_path(p) for p in good])
    arrays["skipped"] = np.array([f"{p}: {why}" for p, why in skipped], dtype=str)
    arrays["settings"] = np.array(settings)
    arrays["weights"] = np.array(extractor.weights_used)
    save_npz(out, **arrays)
    if store is not None:
        store.discard()
    click.echo(f"wrote {out}: {len(good)} image(s), descriptor dim {arrays['desc_0'].shape[1]}"
               + (f", {len(skipped)} unreadable skipped" if skipped else ""))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", type=OutputPath(folder=True), default="pca_out", show_default=True)
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

    from .io import expand_inputs, output_names, replace_outputs, save_png
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
    names = output_names(paths)  # x.jpg and x.png: x_0_pca.png and x_1_pca.png, as every command names them
    for group in groups:
        rgbs = pca_rgb([descs[i] for i in group], [grids[i] for i in group],
                       masks=[masks[i] for i in group] if salient_only else None)
        for i, rgb in zip(group, rgbs):
            save_png(out / f"{names[i]}_pca.png", upsample(rgb, sizes[i], nearest=True))
    replace_outputs(out, [f"{name}_pca.png" for name in names])  # a previous run's other files go
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
