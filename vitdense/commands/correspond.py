"""``vitdense correspond``: best-buddy point correspondences between image pairs (see vitdense/correspond.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ..cli import OutputPath, build_extractor, extractor_options, load_size_arg, main
from ..errors import DataError, ImageError, VitdenseError

LOG = logging.getLogger("vitdense")


def _pairs_from_file(path: Path) -> list[tuple[str, Path, Path]]:
    """Lines "A B" (whitespace-separated; relative paths from the file's folder; '#' starts a comment)."""
    if not path.is_file():
        raise DataError(f"{path}: pairs file not found")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}, line {number}: expected two image paths, got {len(parts)} field(s)")
        a, b = (Path(p) if Path(p).is_absolute() else path.parent / p for p in parts)
        pairs.append((f"{len(pairs):04d}_{a.stem}_{b.stem}", a, b))
    if not pairs:
        raise DataError(f"{path}: no pairs listed")
    return pairs


def _pairs_from_folder(folder: Path) -> list[tuple[str, Path, Path]]:
    """Sub-folders holding exactly two images (the dino-vit-features layout), and NAME_a.* / NAME_b.* files."""
    from ..io import IMAGE_SUFFIXES, natural_key

    def images(d: Path) -> list[Path]:
        return sorted((p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                      key=natural_key)

    pairs = []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir()), key=natural_key):
        found = images(sub)
        if len(found) != 2:
            raise DataError(f"{sub}: a pair folder must hold exactly 2 images, found {len(found)}")
        pairs.append((sub.name, found[0], found[1]))
    files = {p.stem: p for p in images(folder)}
    for stem, path in sorted(files.items()):
        if stem.endswith("_a") and stem[:-2] + "_b" in files:
            pairs.append((stem[:-2], path, files[stem[:-2] + "_b"]))
    if not pairs:
        raise DataError(f"{folder}: no pairs found (expected sub-folders with 2 images each, or NAME_a/NAME_b "
                        "image files)")
    return pairs


def _record(result, path_a: Path, path_b: Path, keep_all: bool) -> dict[str, Any]:
    from ..io import record_path

    shown = result.buddies if keep_all else result.pairs
    return {"image_a": record_path(path_a), "image_b": record_path(path_b),
            "size_a": list(result.size_a), "size_b": list(result.size_b),
            "coordinates": "pixels of the original images; (0, 0) is the centre of the top-left pixel",
            "settings": result.settings, "num_mutual_neighbours": result.num_mutual,
            "num_salient_buddies": len(result.buddies), "message": result.message,
            "pairs": shown.to_records()}


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--pairs", "pairs_file", type=click.Path(dir_okay=False), default=None,
              help="Text file with one pair per line: 'A B' (paths relative to the file).")
@click.option("--out", "out_dir", type=OutputPath(folder=True), default="correspond_out", show_default=True,
              help="Output folder.")
@click.option("--num-pairs", type=int, default=10, show_default=True, help="Well-spread pairs to keep.")
@click.option("--all", "keep_all", is_flag=True, help="Keep (write and draw) every salient best buddy.")
@click.option("--thresh", type=float, default=0.05, show_default=True,
              help="Saliency threshold of the --salient filter (negative: keep every best buddy).")
@click.option("--salient", type=click.Choice(["reference", "both"]), default="reference", show_default=True,
              help="Which best buddies the saliency filter keeps. reference (dino-vit-features): the point in "
                   "A is above --thresh and some salient point of B (not necessarily its buddy) has it as "
                   "nearest neighbour; both: both points are above --thresh.")
@click.option("--kmeans", "kmeans_impl", type=click.Choice(["sklearn", "torch"]), default="sklearn",
              show_default=True,
              help="k-means that spreads the --num-pairs pairs: sklearn (scikit-learn's KMeans as "
                   "dino-vit-features runs it, 10 starts, CPU) or torch (one k-means++ start on the device, "
                   "10-20x faster).")
@click.option("--layer", type=int, default=None,
              help="Transformer layer; default 9 of a 12-block model (3/4 of the depth otherwise).")
@click.option("--bin/--no-bin", "use_bin", default=True, show_default=True, help="Log-binned descriptors.")
@click.option("--backend", type=click.Choice(["auto", "torch", "faiss"]), default="auto", show_default=True,
              help="Nearest-neighbour search: chunked torch matmul (auto) or faiss.")
@extractor_options(stride=4, layer=None, facet="key", load_size=224)
def correspond(inputs: tuple[str, ...], pairs_file: str | None, out_dir: str, num_pairs: int, keep_all: bool,
               thresh: float, salient: str, kmeans_impl: str, layer: int | None, use_bin: bool, backend: str,
               facet: str, **opts: Any) -> None:
    """Semantic point correspondences (best buddies) between image pairs.

    \b
    Pairs come from (one of):
      vitdense correspond A.jpg B.jpg --out OUT     one pair → OUT/correspondences.{png,json}
      vitdense correspond FOLDER --out OUT          every sub-folder of FOLDER holding exactly two images,
                                                    and every NAME_a.* / NAME_b.* pair of files in FOLDER
      vitdense correspond --pairs pairs.txt --out OUT   one 'A B' pair per line
    In batch mode each pair writes OUT/NAME/correspondences.{png,json} and OUT/summary.json lists them all;
    unreadable pairs are skipped and reported there.

    The PNG shows both images side by side with numbered, coloured points joined by lines; the JSON holds
    each pair's pixel coordinates in the original images, cosine similarity and saliency.
    """
    from tqdm import tqdm

    from ..correspond import draw_correspondences, find_correspondences
    from ..io import load_image, record_path, replace_outputs, save_json, save_png

    if num_pairs < 1 and not keep_all:
        raise VitdenseError(f"--num-pairs {num_pairs}: must be at least 1")
    if pairs_file is not None:
        if inputs:
            raise VitdenseError("give either --pairs FILE or image/folder arguments, not both")
        pairs, batch = _pairs_from_file(Path(pairs_file)), True
    elif len(inputs) == 2:
        for p in inputs:
            if Path(p).is_dir():
                raise ImageError(f"{p}: is a folder; give two image files, or one folder for batch mode")
            load_image(p)  # a missing or corrupt B fails now, not after the backbone has described A
        pairs, batch = [("pair", Path(inputs[0]), Path(inputs[1]))], False
    elif len(inputs) == 1 and Path(inputs[0]).is_dir():
        pairs, batch = _pairs_from_folder(Path(inputs[0])), True
    elif len(inputs) == 1 and not Path(inputs[0]).exists():
        raise DataError(f"{inputs[0]}: not found")
    else:
        raise VitdenseError("expected two images (A B), one folder of pairs, or --pairs FILE; "
                            "see vitdense correspond --help")

    extractor = build_extractor(**opts)
    if layer is not None:
        extractor.layer_index(layer)  # fail before any work
    out = Path(out_dir)
    summary, written, folders = [], 0, []
    for name, path_a, path_b in tqdm(pairs, desc="correspond", unit="pair", disable=len(pairs) < 2):
        try:
            result = find_correspondences(extractor, path_a, path_b, num_pairs=num_pairs,
                                          load_size=load_size_arg(opts["load_size"]), layer=layer, facet=facet,
                                          bin=use_bin, thresh=thresh, backend=backend, progress=not batch,
                                          salient=salient, kmeans_impl=kmeans_impl)
        except ImageError as err:
            if not batch:
                raise
            LOG.warning("skipping %s: %s", name, err)
            summary.append({"name": name, "image_a": record_path(path_a), "image_b": record_path(path_b),
                            "error": str(err)})
            continue
        record = _record(result, path_a, path_b, keep_all)
        shown = result.buddies if keep_all else result.pairs
        picture = draw_correspondences(load_image(path_a), load_image(path_b), shown.points_a, shown.points_b)
        target = out / name if batch else out
        save_png(target / "correspondences.png", picture)
        save_json(target / "correspondences.json", record)
        if batch:  # the pair's own record: a stale pair folder with the user's files in it keeps them
            replace_outputs(target, ["correspondences.png", "correspondences.json"])
            folders.append(name)
        written += 1
        summary.append({"name": name, "image_a": record_path(path_a), "image_b": record_path(path_b),
                        "pairs": len(shown), "salient_buddies": len(result.buddies),
                        "message": result.message, "folder": str(target)})
        if result.message:
            click.echo(f"{name}: {result.message}", err=True)
    if batch:
        if written == 0:  # nothing to show: fail without leaving a summary of failures behind
            raise DataError(f"{summary[0]['error']} (no pair of {len(pairs)} could be processed)")
        save_json(out / "summary.json", {"settings": {"num_pairs": num_pairs, "all": keep_all, "thresh": thresh,
                                                      "salient": salient, "kmeans": kmeans_impl,
                                                      "model": extractor.model_type,
                                                      "weights_used": extractor.weights_used},
                                         "pairs": summary})
        replace_outputs(out, folders + ["summary.json"])  # a previous run's other pairs go, the user's files stay
        click.echo(f"wrote {written} of {len(pairs)} pair(s) to {out}")
    else:
        click.echo(f"wrote {out / 'correspondences.png'} and correspondences.json: {len(shown)} pair(s) "
                   f"({len(result.buddies)} salient best buddies)")
