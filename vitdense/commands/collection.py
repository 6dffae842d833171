"""``vitdense embed``: a collection's global descriptors as resumable Parquet shards (local or Ray).

The index build from those shards is ``vitdense index --embeddings`` (vitdense/commands/retrieval.py).
"""
from __future__ import annotations

from typing import Any

import click

from ..cli import OutputPath, extractor_options, main
from ..errors import ConfigError
from .retrieval import _check_loader, _descriptor_config, _extractor, descriptor_options


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", type=OutputPath(folder=True), required=True,
              help="Embeddings folder (Parquet shards + manifest.json); re-running resumes it.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: a Ray Data actor pool (this machine, or --address).")
@click.option("--shard-size", type=int, default=1000, show_default=True,
              help="Images per shard cut from folders and lists (a .tar is one shard): the unit of resume.")
@click.option("--actors", type=int, default=2, show_default=True, help="Ray: extractor actors (one per GPU).")
@click.option("--address", default=None, help="Ray: address of an existing cluster (e.g. auto, or host:6379).")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="Ray: GPUs per actor.")
@click.option("--patch-descriptors", is_flag=True,
              help="Also keep each image's patch tokens (h, w, D) in float16 for dense retrieval, per shard in "
                   "shard-NNNNN.patches.parquet.")
@descriptor_options
@extractor_options(stride=None, layer=None, facet=None, load_size=224)
def embed(sources: tuple[str, ...], out_dir: str, engine: str, shard_size: int, actors: int, address: str | None,
          gpus_per_worker: float, patch_descriptors: bool, **opts: Any) -> None:
    """Embed the images of SOURCES (folders, .txt/.parquet lists of paths, webdataset .tar shards) into
    Parquet shards under --out, each row with a stable id (path, or TAR::MEMBER) and its content hash.

    A rerun embeds only the shards not done (a shard is done when its .parquet and .done.json exist);
    sources not in the folder yet become new shards. Unreadable images are recorded and skipped.
    """
    from ..collection.embed import ExtractorSpec
    from ..collection.engines import embed_collection

    _check_loader(opts["batch_size"], opts["workers"])
    if actors < 1:
        raise ConfigError(f"--actors {actors}: must be at least 1")
    extractor = _extractor(opts)
    config = _descriptor_config(opts, extractor)
    spec = ExtractorSpec(opts["model"], opts["weights"], opts["device"], opts["dtype"], extractor.stride[0])
    report = embed_collection(sources, out_dir, spec, config, engine=engine, built=extractor,
                              shard_size=shard_size, batch_size=opts["batch_size"], num_workers=opts["workers"],
                              actors=actors, address=address, gpus_per_worker=gpus_per_worker,
                              patch_descriptors=patch_descriptors)
    for row_id, reason in report.skipped:
        click.echo(f"skipped {row_id}: {reason}", err=True)
    m = report.manifest
    click.echo(f"embeddings {out_dir}: {m['rows']} row(s) in {len(m['shards'])} shard(s), dim {m['dim']}; "
               f"embedded {len(report.embedded)} shard(s) now ({report.new_rows} images, "
               f"{report.images_per_second:.1f} img/s, engine {engine}), {len(report.already_done)} already done, "
               f"skipped {len(report.skipped)}")
