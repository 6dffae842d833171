"""``vitdense inspect A.jpg [B.jpg ...] --out page.html``: one self-contained HTML page where hovering or
clicking a point of any image shows, in every image, the cosine similarity to that point's descriptor, its
nearest neighbour and whether the two are best buddies (see :mod:`vitdense.inspect_page`).

Writes the page and ``page.json`` beside it (settings, per descriptor choice the compression and its
similarity error, the page's size). Images, facets, layers and the output path are checked before the
backbone runs; both files are written atomically after everything was computed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..cli import OutputPath, build_extractor, extractor_options, load_size_arg, main
from ..errors import ConfigError

FACET_NAMES = ("key", "query", "value", "token")


def _facets(value: str) -> list[str]:
    facets = [f.strip() for f in value.split(",") if f.strip()]
    unknown = [f for f in facets if f not in FACET_NAMES]
    if unknown or not facets:
        raise ConfigError(f"--facets {value}: choose from {', '.join(FACET_NAMES)} (comma-separated)")
    return list(dict.fromkeys(facets))


def _layers(value: str) -> list[int]:
    try:
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--layers {value}: give layer numbers, comma-separated (e.g. 9,11)") from None
    if not layers:
        raise ConfigError(f"--layers {value}: give at least one layer")
    return list(dict.fromkeys(layers))


@main.command("inspect")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=OutputPath(folder=False), default="inspect.html", show_default=True,
              help="HTML file to write (and a .json report beside it).")
@click.option("--facets", "--facet", "facets", default="key", show_default=True,
              help="Facets to export, comma-separated (key, query, value, token).")
@click.option("--layers", "--layer", "layers", default="11", show_default=True,
              help="Layers to export, comma-separated; the page's selector offers every facet x layer.")
@click.option("--dims", type=int, default=128, show_default=True,
              help="Dimensions the descriptors keep in the page (PCA), each quantised to 8 bits.")
@click.option("--error-queries", type=int, default=512, show_default=True,
              help="Query tokens (against all tokens) over which the similarity error is measured.")
@extractor_options(stride=4, layer=None, facet=None, load_size=224)
def inspect_command(images: tuple[str, ...], out: str, facets: str, layers: str, dims: int, error_queries: int,
                    **opts: Any) -> None:
    """Write an interactive HTML page of IMAGES (files or folders): hover or click a point to see its
    descriptor's cosine similarity to every point of every image, its nearest neighbours and best buddies;
    switch facet/layer, show PCA colours or saliency. Opens from disk, no server; also in a notebook.
    """
    import numpy as np
    from tqdm import tqdm

    from ..inspect_page import InspectImage, InspectView, build_inspect_page
    from ..io import check_output, expand_inputs, load_image, record_path, save_json
    from ..backbones import atomic_write

    facet_list, layer_list = _facets(facets), _layers(layers)
    if dims < 1:
        raise ConfigError(f"--dims {dims}: must be at least 1")
    if error_queries < 1:
        raise ConfigError(f"--error-queries {error_queries}: must be at least 1")
    paths = expand_inputs(images)
    for path in paths:  # decode every image now: a corrupt one fails before the backbone runs
        load_image(path)
    page_path = Path(out)  # checked when the options were parsed (OutputPath)
    report_path = check_output(page_path.with_suffix(".json"), folder=False)
    if report_path == page_path:
        raise ConfigError(f"--out {out}: give the page an .html name (the report goes to a .json beside it)")
    extractor = build_extractor(**opts)
    for layer in layer_list:
        extractor.layer_index(layer)

    page_images, descs = [], {(f, l): [] for f in facet_list for l in layer_list}
    for path in tqdm(paths, desc="extract", unit="img", disable=len(paths) < 2):
        batch, pil = extractor.preprocess(path, load_size_arg(opts["load_size"]))
        saliency = None
        for n, facet in enumerate(facet_list):
            feats = extractor.extract(batch, layer_list, facet, saliency=n == 0 and extractor.has_cls)
            for layer in layer_list:
                descs[(facet, layer)].append(feats.descriptors[layer][0].cpu())
            if n == 0 and feats.saliency is not None:
                saliency = feats.saliency[0].cpu().numpy()
        page_images.append(InspectImage(path.name, np.asarray(pil), feats.num_patches, saliency))
    views = [InspectView(f"{facet}, layer {extractor.layer_index(layer)}", descs[(facet, layer)])
             for facet in facet_list for layer in layer_list]
    info = {"model": extractor.model_type, "weights": getattr(extractor, "weights_used", extractor.model_type),
            "stride": extractor.stride[0], "patch": extractor.p,
            "load size": opts["load_size"] or "original"}
    page = build_inspect_page(page_images, views, extractor.p, extractor.stride[0], dims=dims,
                              error_queries=error_queries, title=f"vitdense inspect: {len(paths)} image(s)",
                              info=info)
    report = {"command": "inspect", "page": record_path(page_path), **page.report,
              "images": [{**entry, "path": record_path(p)} for entry, p in zip(page.report["images"], paths)]}
    atomic_write(page_path, lambda tmp: Path(tmp).write_text(page.html, encoding="utf-8"))
    save_json(report_path, report)
    errors = "; ".join(f"{v['label']}: mean {v['similarity_error']['mean']:.4f}, max "
                       f"{v['similarity_error']['max']:.4f}" for v in page.report["views"])
    click.echo(f"wrote {page_path} ({page.report['page_bytes'] / 1e6:.2f} MB, {len(paths)} image(s), "
               f"{len(views)} descriptor choice(s)); cosine-similarity error of the page's compressed "
               f"descriptors: {errors}; report {report_path}")
