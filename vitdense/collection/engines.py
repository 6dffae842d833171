"""Where shards run: ``local`` (this process: one DataLoader streaming every pending shard, its workers
decoding, batches embedded in lanes of single-thread torch) or ``ray`` (a Ray Data actor pool, each actor
holding its own extractor, on this machine or an existing Ray cluster).

Both embed a shard's rows in the same batches with the same per-batch function (:mod:`.embed`) and write
each shard with :func:`finish_shard` (Parquet, then done-marker), so they give the same rows; neither
decides what is computed. A shard is the unit of resume: an interruption loses at most the shards in
flight, and a rerun embeds only the shards not marked done.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import ConfigError, DataError
from ..extractor import ViTExtractor
from ..retrieval import DescriptorConfig, backbone_identity
from .embed import ExtractorSpec, ShardRows, embed_shard, embed_shards
from .shards import Collection, write_shard
from .sources import ShardSpec, record_sources

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)
ENGINES = ("local", "ray")
# Test hook: when this names a file that does not exist yet, the process that writes a shard creates it and
# dies (os._exit) between the shard's Parquet file and its done-marker: the worst moment to be killed.
_DIE_HOOK = "VITDENSE_TEST_DIE_ONCE"


def process_shard(root: str | os.PathLike, spec: ShardSpec, extractor: ViTExtractor, config: DescriptorConfig,
                  batch_size: int, num_workers: int = 0, patches: bool = False) -> dict[str, Any]:
    """Embed one shard and write it (patch descriptors when ``patches``, Parquet, then done-marker); return
    the marker."""
    start = time.perf_counter()
    rows = embed_shard(spec, extractor, config, batch_size, num_workers, patches)
    return finish_shard(root, spec, rows, time.perf_counter() - start)


def finish_shard(root: str | os.PathLike, spec: ShardSpec, rows: ShardRows, seconds: float) -> dict[str, Any]:
    """Write an embedded shard (Parquet, then done-marker: :func:`~.shards.write_shard`); return the marker.
    Every engine writes its shards here, where the test hook ``VITDENSE_TEST_DIE_ONCE`` can kill it."""
    hook = os.environ.get(_DIE_HOOK)
    if hook and not os.path.exists(hook):
        from .shards import shard_path
        import pyarrow as pa  # noqa: F401  (the Parquet half of the write happens, the marker does not)

        write_shard(root, spec.name, rows, 0.0)
        os.unlink(Path(root) / f"{spec.name}.done.json")
        Path(hook).write_text(f"{os.getpid()} {spec.name} {shard_path(root, spec.name)}\n")
        os._exit(1)
    return write_shard(root, spec.name, rows, seconds)


@dataclass
class EmbedReport:
    """What :func:`embed_collection` did: shards embedded now / already done, rows, skipped rows, time."""

    root: Path
    engine: str
    embedded: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    rows: int = 0
    new_rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)
    # (seconds since the engine started, rows, worker's process id) of each shard embedded now, in the order
    # they finished
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.new_rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """Images/s once the engine is running (Ray's actors started, the extractor built, the first batches
        decoded): each worker's rows from its first finished shard to its last over that time, summed over
        the workers; 0.0 when no worker finished two shards."""
        total = 0.0
        for worker in {w for _, _, w in self.timeline}:
            mine = [(t, r) for t, r, w in self.timeline if w == worker]
            if len(mine) > 1 and mine[-1][0] > mine[0][0]:
                total += sum(r for _, r in mine[1:]) / (mine[-1][0] - mine[0][0])
        return total


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="embed", unit="shard", disable=not progress)


# At most this many batches embedded at once by the local engine: each lane holds one batch's activations.
MAX_LANES = 4


def local_lanes(device: str | torch.device) -> tuple[int, int]:
    """(lanes, torch threads per lane) of the local engine on ``device``: on a CPU, torch's threads split
    into at most MAX_LANES lanes of equal threads (one thread a lane up to MAX_LANES threads); on a GPU one
    lane with the threads as they are. The decoding workers are not counted off: they need little CPU, and
    single-thread lanes lose little to a process that preempts one of them, where one pass on all threads
    waits for its slowest thread (ViT-S/16 batches on 2 cores beside a busy process of another session:
    6.6 img/s on 2 threads, 11.7 in 2 lanes of one)."""
    import torch

    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads < 2:
        return 1, threads
    per_lane = -(-threads // MAX_LANES)
    return threads // per_lane, per_lane


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block, put back as they were after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_local(root: Path, specs: Sequence[ShardSpec], extractor: ViTExtractor, config: DescriptorConfig,
              batch_size: int, num_workers: int, progress: bool = True, patches: bool = False,
              timeline: list[tuple[float, int, int]] | None = None) -> list[dict[str, Any]]:
    """Run the shards in this process: one DataLoader streams them all (its ``num_workers`` processes start
    once and decode ahead across shards), batches are embedded in :func:`local_lanes` lanes (torch's thread
    count set for the run and put back after it), and each shard is written as soon as its rows are complete;
    its (seconds since the run started, rows, process id) is appended to ``timeline``."""
    markers = []
    lanes, threads = local_lanes(extractor.device)
    start, images = time.perf_counter(), 0
    # closing: the lanes and decoding workers end inside the block, also when a shard's write fails
    with _bar(len(specs), progress) as bar, _torch_threads(threads), \
            closing(embed_shards(specs, extractor, config, batch_size, num_workers, patches, lanes)) as shards:
        since = start  # a shard's seconds: from the previous shard's write to its own rows
        for spec, rows in shards:
            markers.append(finish_shard(root, spec, rows, time.perf_counter() - since))
            images += markers[-1]["rows"]
            since = time.perf_counter()
            if timeline is not None:
                timeline.append((since - start, markers[-1]["rows"], os.getpid()))
            bar.set_postfix(img=images, img_s=f"{images / (since - start):.1f}")
            bar.update()
    return markers


class _RayShardWorker:
    """Ray Data actor: builds the extractor once, then embeds and writes the shards it is given."""

    def __init__(self, root: str, extractor_spec: ExtractorSpec, config: dict, batch_size: int,
                 patches: bool = False):
        import torch

        torch.set_num_threads(1)  # several actors share the machine's cores
        self.root, self.batch_size, self.patches = Path(root), batch_size, patches
        self.config = DescriptorConfig.from_dict(config)
        self.extractor = extractor_spec.build()

    def __call__(self, batch: dict) -> dict:
        names, rows, skipped, finished, worker = [], [], [], [], []
        for text in batch["shard"]:
            spec = json.loads(str(text))
            spec = ShardSpec(spec["name"], spec["kind"], tuple(spec["items"]), spec["tar"])
            marker = process_shard(self.root, spec, self.extractor, self.config, self.batch_size, 0, self.patches)
            names.append(spec.name)
            rows.append(marker["rows"])
            skipped.append(len(marker["skipped"]))
            finished.append(time.time())  # Ray Data hands rows to the driver in bunches: the actor's clock
            worker.append(os.getpid())
        return {"name": names, "rows": rows, "skipped": skipped, "finished": finished, "worker": worker}


def run_ray(root: Path, specs: Sequence[ShardSpec], extractor_spec: ExtractorSpec, config: DescriptorConfig,
            batch_size: int, actors: int = 2, address: str | None = None, gpus_per_worker: float = 0.0,
            progress: bool = True, patches: bool = False, timeline: list[tuple[float, int, int]] | None = None
            ) -> list[str]:
    """Run the shards on a Ray Data actor pool of ``actors`` actors (one block = one shard, so Ray's
    retries and our resume both work shard by shard). Connects to ``address`` (an existing cluster, or
    "auto"), else starts a local Ray unless one is running in this process. Each finished shard's
    (seconds since the pool was asked for, rows, actor's process id) is appended to ``timeline``."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'vitdense[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            # declare at least actors + 2 logical CPUs: on a 2-core machine num_cpus=2 with 2 actors deadlocks
            kwargs["num_cpus"] = max(os.cpu_count() or 1, actors + 2)
        ray.init(**kwargs)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [{"shard": json.dumps({"name": s.name, "kind": s.kind, "items": list(s.items), "tar": s.tar})}
                 for s in specs]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(_RayShardWorker, batch_size=1, concurrency=actors, num_gpus=gpus_per_worker or None,
                             num_cpus=1,
                             fn_constructor_kwargs=dict(root=str(root), extractor_spec=ExtractorSpec(
                                 **{**extractor_spec.__dict__, "device": "cuda" if gpus_per_worker else "cpu"}),
                                 config=config.to_dict(), batch_size=batch_size, patches=patches))
        done, start, wall, images = [], time.perf_counter(), time.time(), 0
        with _bar(len(specs), progress) as bar:
            for row in out.iter_rows():
                done.append(row["name"])
                images += int(row["rows"])
                if timeline is not None:
                    timeline.append((float(row["finished"]) - wall, int(row["rows"]), int(row["worker"])))
                bar.set_postfix(img=images, img_s=f"{images / (time.perf_counter() - start):.1f}")
                bar.update()
        if timeline is not None:
            timeline.sort()
        return done
    finally:
        if started:
            ray.shutdown()


def embed_collection(sources: Sequence[str | os.PathLike], out: str | os.PathLike,
                     extractor: ExtractorSpec | ViTExtractor, config: DescriptorConfig, engine: str = "local",
                     shard_size: int = 1000, batch_size: int = 16, num_workers: int = 2, actors: int = 2,
                     address: str | None = None, gpus_per_worker: float = 0.0,
                     progress: bool = True, built: ViTExtractor | None = None,
                     patch_descriptors: bool = False) -> EmbedReport:
    """Embed the images of ``sources`` (folders, .txt/.parquet lists, webdataset .tar shards) into Parquet
    shards under ``out`` (see :mod:`vitdense.collection.shards`); resumable: a rerun embeds only the shards
    not done yet, and sources it does not hold yet become new shards.

    ``extractor``: an :class:`ExtractorSpec` (needed by ``engine="ray"``: each actor builds its own copy)
    or a built ViTExtractor (local engine only). ConfigError when the folder holds another backbone's or
    another descriptor setting's vectors. ``built``: the extractor of an ExtractorSpec when the caller
    has already built it (saves building it again here). ``patch_descriptors``: also keep each image's
    patch tokens (h, w, D) in float16, per shard in NAME.patches.parquet (read them with
    :func:`vitdense.collection.shards.read_patches`); a collection is embedded with them or without.
    """
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be at least 1")
    if engine == "ray" and not isinstance(extractor, ExtractorSpec):
        raise ConfigError("engine 'ray' needs an ExtractorSpec (each worker builds its own extractor)")
    files, tars, records = record_sources(sources)
    if not files and not tars:
        raise DataError(f"{', '.join(map(str, sources))}: no images or .tar shards found")
    if built is None:
        built = extractor.build() if isinstance(extractor, ExtractorSpec) else extractor
    weights = extractor.weights if isinstance(extractor, ExtractorSpec) else None
    model_arg = extractor.model if isinstance(extractor, ExtractorSpec) else None
    if config.stride is not None and built.stride[0] != config.stride:
        raise ConfigError(f"descriptor config asks for stride {config.stride}, the extractor has {built.stride[0]}")
    identity = backbone_identity(built, weights, model_arg)
    coll = Collection.open_or_create(out, files, tars, identity, config, config.dim(built.embed_dim), shard_size,
                                     patch_descriptors, records)
    pending = coll.pending()
    report = EmbedReport(coll.root, engine, already_done=[s.name for s in coll.shards if s not in pending])
    start = time.perf_counter()
    if pending:
        if engine == "local":
            run_local(coll.root, pending, built, config, batch_size, num_workers, progress, patch_descriptors,
                      report.timeline)
        else:
            del built  # the actors build their own
            run_ray(coll.root, pending, extractor, config, batch_size, actors, address, gpus_per_worker, progress,
                    patch_descriptors, report.timeline)
    report.seconds = time.perf_counter() - start
    report.manifest = coll.write_manifest()
    from .shards import is_done, read_marker

    report.embedded = [s.name for s in pending if is_done(coll.root, s.name)]
    for entry in report.manifest["shards"]:
        if entry["status"] == "done":
            marker = read_marker(coll.root, entry["name"])
            report.rows += marker["rows"]
            report.skipped += [tuple(s) for s in marker["skipped"]]
            if entry["name"] in report.embedded:
                report.new_rows += marker["rows"]
    return report
