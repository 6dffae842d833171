"""``vitdense evaluate``: the report card of one or more backbones, beside a random-initialisation floor.

Builds the evaluation data on first use (Debian packages and scikit-image, see :mod:`vitdense.evalset`),
then calls :func:`vitdense.evaluate.evaluate_backbones` and writes OUT/report.json, OUT/report.md,
OUT/charts/TASK.png and OUT/examples/LABEL_TASK.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..cli import OutputPath, main
from ..errors import ConfigError


def _candidate(spec: str | None, weights: str | None, device: str, stride: int) -> Any:
    """A Candidate from --model/--weights (or a --compare value: an existing file is weights, else a name)."""
    from ..cli import build_extractor
    from ..evaluate import Candidate

    ext = build_extractor(model=spec, weights=weights, device=device, dtype="float32", stride=stride)
    if weights is not None:
        label, source = Path(weights).stem, f"weights file {weights}"
    else:
        label, source = ext.model_type, f"model {ext.model_type}"
    return Candidate(label, ext, source)


def _unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, n = label, 2
        while name in out:
            name, n = f"{label} ({n})", n + 1
        out.append(name)
    return out


@main.command("evaluate")
@click.option("--model", default=None, help="Backbone to grade (see `vitdense models`); default: the default one.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Weights file of the backbone to grade (architecture read from the file).")
@click.option("--compare", "compare", multiple=True, metavar="NAME_OR_FILE",
              help="Another backbone to grade side by side (repeatable): a weights file or a model name.")
@click.option("--out", "out_dir", type=OutputPath(folder=True), default=None,
              help="Folder for report.json, report.md, charts/ and examples/ (required unless only --prepare).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Evaluation data folder (default: $VITDENSE_DATA or ~/.cache/vitdense/eval-v1); built on "
                   "first use.")
@click.option("--prepare", is_flag=True,
              help="(Re)build the data folder from the Debian packages first; without --out, only that.")
@click.option("--quick", is_flag=True, help="A fixed subset: 2 co-segmentation groups, 2 pairs, 1 short video, "
                                            "a few k-NN images per class.")
@click.option("--tasks", default="all", show_default=True,
              help="Comma-separated subset of coseg, saliency, knn, correspond, video.")
@click.option("--load-size", type=int, default=224, show_default=True,
              help="Shorter image side for co-segmentation, saliency and correspondences (the commands' "
                   "default).")
@click.option("--knn-size", type=int, default=128, show_default=True, help="Side of the k-NN images.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of k-means, the random floor and the --quick subset.")
@click.option("--correspond-salient", type=click.Choice(["reference", "both"]), default="reference",
              show_default=True, help="`vitdense correspond --salient` for the correspond task.")
@click.option("--correspond-kmeans", type=click.Choice(["sklearn", "torch"]), default="sklearn",
              show_default=True, help="`vitdense correspond --kmeans` for the correspond task.")
@click.option("--video-normalization", type=click.Choice(["reference", "model"]), default="reference",
              show_default=True, help="`vitdense propagate --normalization` for the video task.")
def evaluate_command(model: str | None, weights: str | None, compare: tuple[str, ...], out_dir: str | None,
                     data_dir: str | None, prepare: bool, quick: bool, tasks: str, load_size: int, knn_size: int,
                     device: str, seed: int, correspond_salient: str, correspond_kmeans: str,
                     video_normalization: str) -> None:
    """Grade backbones on ground truth: co-segmentation, saliency, k-NN, correspondences, video.

    Every backbone named (--model/--weights, then each --compare) is graded on the same data with the
    commands' defaults, beside a randomly initialised backbone of the first one's architecture (the
    floor). Prints the time per task; writes OUT/report.json, OUT/report.md, OUT/charts/*.png and
    OUT/examples/*.png.
    """
    from ..backbones import name_or_file
    from ..evalset import default_data_dir, load_manifest, prepare_eval_data
    from ..evaluate import TASKS, EvalSettings, evaluate_backbones

    chosen = TASKS if tasks.strip() == "all" else tuple(t.strip() for t in tasks.split(",") if t.strip())
    for name, value in (("--load-size", load_size), ("--knn-size", knn_size)):
        if value < 16:
            raise ConfigError(f"{name} {value}: must be at least 16 px")
    settings = EvalSettings(tasks=chosen, quick=quick, seed=seed, load_size=load_size, knn_load_size=knn_size,
                            correspond_salient=correspond_salient, correspond_kmeans=correspond_kmeans,
                            video_normalization=video_normalization)  # checks --tasks
    if out_dir is None and not prepare:
        raise ConfigError("--out DIR is required (or pass --prepare alone to build the data folder)")
    data = Path(data_dir) if data_dir else default_data_dir()
    if prepare or not data.exists():
        click.echo(f"preparing the evaluation data in {data} (Debian packages are downloaded once)", err=True)
        prepare_eval_data(data, progress=True)
        if out_dir is None:
            click.echo(f"wrote the evaluation data to {data}")
            return
    load_manifest(data)  # a broken or outdated folder fails before any backbone is loaded

    stride = settings.stride
    candidates = [_candidate(model, weights, device, stride)]
    for item in compare:
        candidates.append(_candidate(*name_or_file(item), device, stride))
    for cand, label in zip(candidates, _unique([c.label for c in candidates])):
        cand.label = label

    def report_task(label: str, task: str, result: Any) -> None:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in list(result.scores.items())[:4])
        click.echo(f"[{label}] {task}: {result.seconds:.1f} s  {shown}", err=True)

    report = evaluate_backbones(candidates, data, settings, progress=True, on_task=report_task)
    report.write(out_dir)
    click.echo(report.markdown())
    click.echo(f"wrote {out_dir}: report.json, report.md, charts/, examples/ ({report.seconds:.0f} s)")
