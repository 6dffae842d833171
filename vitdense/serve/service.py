"""The work behind the routes: the loaded index (swapped atomically on reload), the query batcher, the
dense analyses of the page (correspondences, similarity heat map) and the statistics.

Shapes: B queries in a batch, D' channels of a global descriptor, K results, T tokens, D token channels.

Consistency: every request takes :attr:`Service.snapshot` once and uses only that object, and a reload
builds a complete new :class:`Snapshot` before it replaces the reference in one assignment, so a request
sees one index generation from start to end, never a mix. The index is opened by :func:`open_index`
alone: another on-disk format plugs in there. Two do: an image-folder index (:class:`Snapshot`, its ids in
memory) and a sharded index (:class:`vitdense.serve.sharded.ShardedSnapshot`, ids checked row by row); both
answer ``row``, ``public_id``, ``name``, ``vector``, ``search``, ``file`` and ``summary``.

Batching: an uploaded query announces itself to the :class:`Batcher` when its request arrives, is decoded,
resized and normalised in a worker thread, then queued; one background thread takes the waiting queries
(at most ``max_batch``), waits up to ``window_s`` for announced ones still being prepared (never when there
are none), and runs the images of equal shape through one forward pass. Every forward pass (batched queries, the
dense descriptors of /correspond and /heatmap) holds one device lock, since the extractor is not
re-entrant.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable

import numpy as np
import torch
from PIL import Image

from ..cache import LRU
from ..errors import DataError
from ..retrieval import ImageIndex, global_descriptors, preprocess_image
from .security import (IndexedFile, Limits, RequestError, check_id, decode_upload, image_id, inside,
                       servable_path)
from .sharded import ShardedSnapshot, open_sharded

LOG = logging.getLogger("vitdense.serve")

THUMB_SIDE = 256
MAX_K = 100


# ============================================================================ the index

@dataclass(frozen=True)
class Snapshot:
    """One loaded generation of an index: never modified after it is built.

    ids[i] is the public id of row i; rows maps an id back to its row; collection is the folder outside
    which no file is served; hidden: rows of images outside it (never named in an answer).
    """

    index: ImageIndex
    ids: list[str]
    rows: dict[str, int]
    collection: str | None
    stamp: tuple[int, int, int]
    loaded_at: float
    hidden: frozenset[int] = frozenset()
    kind = "image-folder"

    @property
    def generation(self) -> int:
        return self.index.generation

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, id_: str) -> int:
        """Row of an id; RequestError 404 for anything that is not an id of this generation."""
        row = self.rows.get(check_id(id_))
        if row is None or row in self.hidden:
            raise RequestError(404, "no such image")
        return row

    def path(self, id_: str) -> Path:
        """The servable file of an id (see :func:`vitdense.serve.security.servable_path`)."""
        return servable_path(self.index.entries[self.row(id_)].path, self.collection)

    def name(self, row: int) -> str:
        return Path(self.index.entries[row].path).name

    def public_id(self, row: int) -> str:
        return self.ids[row]

    def vector(self, row: int) -> np.ndarray:
        return np.asarray(self.index.vectors[row])

    def search(self, vector: np.ndarray, k: int, exclude: int | None = None
               ) -> list[tuple[float, int, str, str]]:
        """Top-k (score, row, public id, name) of a (D',) descriptor, leaving out ``exclude`` and the hidden
        rows."""
        extra = (exclude is not None) + len(self.hidden)
        scores, rows = self.index.search(np.asarray(vector, np.float32)[None], k + extra)
        return [(float(s), int(r), self.ids[r], self.name(int(r))) for s, r in zip(scores[0], rows[0])
                if r >= 0 and r != exclude and r not in self.hidden][:k]

    def file(self, id_: str) -> IndexedFile:
        path = self.path(id_)
        st = path.stat()
        return IndexedFile(path, path.suffix.lower(), (st.st_size, st.st_mtime_ns))

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "faiss": self.index.faiss_config.kind}


def index_stamp(root: str | os.PathLike) -> tuple[int, int, int]:
    """(inode, mtime_ns, size) of index.json: changes with every save (json written last, atomically)."""
    try:
        st = os.stat(Path(root) / "index.json")
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def open_index(root: str | os.PathLike, collection: str | os.PathLike | None = None, previous: Any = None,
               id_shards: int = 32) -> Snapshot | ShardedSnapshot:
    """Load an index folder into a :class:`Snapshot`, or a :class:`ShardedSnapshot` for a folder built by
    ``vitdense index --embeddings`` (the one place that knows the on-disk formats).

    ``collection``: the folder whose files may be served (default: the folder the index recorded, else the
    common folder of its images). DataError when the folder is not a complete index. ``previous``: the
    snapshot served until now (a sharded one reuses what it derived from an unchanged embeddings folder);
    ``id_shards``: how many shards' ids a sharded snapshot keeps in memory.
    """
    stamp = index_stamp(root)
    if not (Path(root) / "index.json").exists() and (Path(root) / "build.json").exists():
        raise DataError(f"{root}: the index is incomplete (a `vitdense index --embeddings` run was interrupted "
                        f"before it wrote index.json); re-run it to finish")
    idx = ImageIndex.load(root)
    if not isinstance(idx, ImageIndex):
        return open_sharded(root, stamp, collection, previous, id_shards)
    if idx.index is None:
        raise DataError(f"{root}: the index is incomplete (an indexing run was interrupted); re-run "
                        f"`vitdense index` to finish it")
    paths = [e.path for e in idx.entries]
    if collection is not None:
        folder = os.path.realpath(collection)
    elif idx.source:
        folder = os.path.realpath(idx.source)
    else:
        folder = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else None
        LOG.warning("%s: the index does not record its collection folder (built before vitdense serve); "
                    "serving files under %s (set --root to narrow it)", root, folder)
    hidden = frozenset(r for r, p in enumerate(paths) if folder and not inside(p, folder))
    if hidden:
        LOG.warning("%d indexed image(s) lie outside %s (symlinks out of the collection) and are not served",
                    len(hidden), folder)
    ids = [image_id(p) for p in paths]
    return Snapshot(idx, ids, {i: r for r, i in enumerate(ids)}, folder, stamp, time.time(), hidden)


# ============================================================================ batching

@dataclass
class _Job:
    tensor: torch.Tensor  # (3, H, W) normalised
    future: Future


class Batcher:
    """Runs queued query images through the network in batches (see module doc); one background thread.

    The window is spent only on queries known to be coming: a request announces itself
    (:meth:`announce`) when it arrives, before its image is decoded and resized, and :meth:`submit`
    turns the announcement into a queued job. A batch starts as soon as ``max_batch`` jobs wait, or no
    announced query is still being prepared, or ``window_s`` has passed since its first job was taken;
    so a lone query never waits, and queries that arrive together share a forward pass even when their
    decoding takes longer than the window would allow on a busy machine.
    """

    def __init__(self, embed, window_s: float = 0.005, max_batch: int = 32):
        self.embed = embed  # (B, 3, H, W) → (B, D') numpy
        self.window_s, self.max_batch = window_s, max(1, max_batch)
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._preparing = 0  # announced queries not yet submitted
        self._stopping = False
        self.batches = 0
        self.batched = 0
        self.largest = 0
        self.forward_s = 0.0  # seconds spent in forward passes of queries
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            self._ensure_thread()

    def _ensure_thread(self) -> None:  # with self._cond held
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="vitdense-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread (a later submit starts another)."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=10)

    def announce(self) -> None:
        """A query has arrived and will be submitted (or withdrawn) once its image is prepared."""
        with self._cond:
            self._preparing += 1

    def withdraw(self) -> None:
        """An announced query will not be submitted (its image was refused)."""
        with self._cond:
            self._preparing = max(0, self._preparing - 1)
            self._cond.notify_all()

    def submit(self, tensor: torch.Tensor, announced: bool = False) -> Future:
        """Queue one (3, H, W) image; the future's result is its (D',) descriptor. ``announced``: the
        query was announced with :meth:`announce` (the announcement ends here)."""
        job = _Job(tensor, Future())
        with self._cond:
            if announced:
                self._preparing = max(0, self._preparing - 1)
            self._jobs.append(job)
            self._ensure_thread()  # a thread that is stopping still takes this job before it ends
            self._cond.notify_all()
        return job.future

    def _next_batch(self) -> list[_Job] | None:
        """The jobs of the next forward pass (see the class doc); None when stopping with nothing queued."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if not self._jobs:
                self._thread = None  # stopping: the next submit starts another thread
                return None
            deadline = time.monotonic() + self.window_s
            while len(self._jobs) < self.max_batch and self._preparing > 0 and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return [self._jobs.popleft() for _ in range(min(len(self._jobs), self.max_batch))]

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            groups: dict[tuple[int, ...], list[_Job]] = {}
            for job in batch:
                groups.setdefault(tuple(job.tensor.shape), []).append(job)
            for group in groups.values():
                start = time.perf_counter()
                try:
                    vectors = self.embed(torch.stack([j.tensor for j in group]))
                except Exception as err:  # noqa: BLE001 - handed to each waiting request
                    for job in group:
                        job.future.set_exception(err)
                    continue
                self.forward_s += time.perf_counter() - start
                for job, vec in zip(group, vectors):
                    job.future.set_result(vec)
                self.batches += 1
                self.batched += len(group)
                self.largest = max(self.largest, len(group))


# ============================================================================ statistics

class Latencies:
    """The last ``size`` latencies of a kind of request, in milliseconds, and a count of all served."""

    def __init__(self, size: int = 4096):
        self.values: deque[float] = deque(maxlen=size)
        self.count = 0
        self.errors = 0
        self._lock = threading.Lock()

    def add(self, ms: float, ok: bool = True) -> None:
        with self._lock:
            self.values.append(ms)
            self.count += 1
            self.errors += not ok

    def summary(self) -> dict[str, Any]:
        with self._lock:
            vals = np.array(self.values, dtype=np.float64)
            count, errors = self.count, self.errors
        out: dict[str, Any] = {"count": count, "errors": errors}
        if len(vals):
            for q in (50, 90, 99):
                out[f"p{q}_ms"] = round(float(np.percentile(vals, q)), 2)
        return out


# ============================================================================ the service

@dataclass
class ServeConfig:
    """Settings of a running service.

    window_s: how long the batcher may wait for queries that have arrived and are still being prepared
    (never when there are none; 0: take only those already queued); max_batch: queries per forward pass (1:
    no batching); poll_s: how often the index folder is checked for a new generation (0: only on SIGHUP);
    correspond_*: the dense settings of /correspond and /heatmap (those of ``vitdense correspond``);
    id_shards: a sharded index keeps the ids of this many shards in memory (least recently used dropped).
    """

    index_dir: str
    collection: str | None = None
    window_s: float = 0.005
    max_batch: int = 32
    poll_s: float = 2.0
    default_k: int = 12
    correspond_stride: int = 4
    correspond_load_size: int = 224
    correspond_pairs: int = 10
    heat_facet: str = "key"
    thumb_cache: int = 1024
    id_shards: int = 32
    extra: dict[str, Any] = field(default_factory=dict)


class Service:
    """The loaded index and network, and every operation a route performs (each a plain method)."""

    def __init__(self, config: ServeConfig, extractor, snapshot: Snapshot | None = None):
        self.config = config
        self.extractor = extractor
        self.snapshot = snapshot if snapshot is not None else open_index(config.index_dir, config.collection,
                                                                          id_shards=config.id_shards)
        self.device_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self.batcher = Batcher(self._embed_batch, config.window_s, config.max_batch)
        self.started = time.time()
        self.latency = {"search_upload": Latencies(), "search_id": Latencies(), "correspond": Latencies(),
                        "heatmap": Latencies()}
        self.reloads = 0
        self.reload_error: str | None = None
        self.thumbs = LRU(config.thumb_cache)
        self.dense = LRU(16)  # dense descriptors of the last images the page asked about

    # ------------------------------------------------------------------ reload
    def reload(self, force: bool = False) -> bool:
        """Load the index folder again and swap it in when its generation changed (or ``force``).

        The new snapshot must come from the same backbone and descriptor settings (the network stays
        loaded); otherwise, or when the folder cannot be read (a save in progress), the old one stays and
        ``reload_error`` says why. Returns whether a new snapshot is now served.
        """
        with self._reload_lock:
            current = self.snapshot
            if not force and index_stamp(self.config.index_dir) == current.stamp:
                return False
            try:
                fresh = open_index(self.config.index_dir, self.config.collection, current,
                                   self.config.id_shards)
            except DataError as err:
                self.reload_error = str(err)
                LOG.warning("reload failed, still serving generation %d: %s", current.generation, err)
                return False
            old, new = current.index, fresh.index
            if (new.backbone.get("fingerprint") != old.backbone.get("fingerprint")
                    or new.descriptor != old.descriptor):
                self.reload_error = (f"{self.config.index_dir}: generation {new.generation} was built with another "
                                     f"backbone or descriptor; restart vitdense serve to serve it")
                LOG.warning(self.reload_error)
                return False
            if fresh.generation == current.generation and not force:
                return False
            self.snapshot = fresh  # one assignment: a request holds either the old or the new snapshot
            self.reloads += 1
            self.reload_error = None
            LOG.info("serving generation %d (%d images)", fresh.generation, len(fresh))
            return True

    # ------------------------------------------------------------------ queries
    def _embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        with self.device_lock:
            vec = global_descriptors(self.extractor, batch, self.snapshot.index.descriptor)
        return vec.cpu().numpy().astype(np.float32)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) network input of a query image in the index's descriptor settings."""
        desc = self.snapshot.index.descriptor
        tensor = preprocess_image(image, desc, self.extractor.mean, self.extractor.std)
        if min(tensor.shape[-2:]) < self.extractor.p:
            raise RequestError(422, f"image of {image.width}x{image.height} px is smaller than one "
                                    f"{self.extractor.p}-px patch after resizing")
        return tensor

    def _decode_prepare(self, data: bytes, limits: Limits) -> tuple[Image.Image, torch.Tensor]:
        image = decode_upload(data, limits)
        return image, self.prepare(image)

    def results(self, snapshot: Snapshot | ShardedSnapshot, vector: np.ndarray, k: int,
                exclude: int | None = None) -> list[dict[str, Any]]:
        """Top-k hits of one (D',) descriptor in ``snapshot`` as JSON-ready dicts (``exclude``: a row left
        out, the query itself when it is indexed)."""
        hits = snapshot.search(vector, k, exclude)
        return [{"rank": n + 1, "id": id_, "score": round(s, 6), "name": name}
                for n, (s, _, id_, name) in enumerate(hits)]

    async def search_upload(self, data: bytes | Awaitable[bytes], k: int, limits: Limits) -> dict[str, Any]:
        """Results for an uploaded image: decoded and resized in a worker thread, embedded by the batcher.

        ``data``: the image's bytes, or an awaitable of them (the request body still arriving: the query is
        announced to the batcher before it is read)."""
        start = time.perf_counter()
        snap = self.snapshot
        ok = False
        self.batcher.announce()  # the batcher may wait for this query while it is being prepared
        submitted = False
        try:
            if not isinstance(data, bytes):
                data = await data
            image, tensor = await asyncio.to_thread(self._decode_prepare, data, limits)
            future = self.batcher.submit(tensor, announced=True)
            submitted = True
            vector = await asyncio.wrap_future(future)
            hits = self.results(snap, vector, k)
            ok = True
        finally:
            if not submitted:
                self.batcher.withdraw()
            self.latency["search_upload"].add(1000 * (time.perf_counter() - start), ok)
        return {"query": {"upload": True, "size": [image.height, image.width]}, "generation": snap.generation,
                "k": k, "results": hits}

    def search_id(self, id_: str, k: int) -> dict[str, Any]:
        """Results for an indexed image, from its stored descriptor (no forward pass)."""
        start = time.perf_counter()
        snap = self.snapshot
        row = snap.row(id_)
        hits = self.results(snap, snap.vector(row), k, exclude=row)
        self.latency["search_id"].add(1000 * (time.perf_counter() - start))
        return {"query": {"id": id_, "name": snap.name(row)}, "generation": snap.generation, "k": k,
                "results": hits}

    # ------------------------------------------------------------------ files
    def image_bytes(self, id_: str) -> tuple[bytes, str]:
        """The indexed file's bytes and a media type (404 for anything not servable)."""
        file = self.snapshot.file(id_)
        suffix = file.suffix.lstrip(".")
        kind = {"jpg": "jpeg", "tif": "tiff"}.get(suffix, suffix)
        return file.read(), f"image/{kind}"

    def thumbnail(self, id_: str) -> bytes:
        """A JPEG at most THUMB_SIDE px on its longer side, cached in memory by id and file state."""
        file = self.snapshot.file(id_)
        key = (id_, file.state)
        cached = self.thumbs.get(key)
        if cached is not None:
            return cached
        image = self._decode_indexed(file.read())
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        data = out.getvalue()
        self.thumbs.put(key, data)
        return data

    def indexed_image(self, snapshot: Snapshot | ShardedSnapshot, id_: str) -> Image.Image:
        """An indexed image decoded as RGB (404 when not servable, 422 when the file is no longer an image)."""
        return self._decode_indexed(snapshot.file(id_).read())

    @staticmethod
    def _decode_indexed(data: bytes) -> Image.Image:
        # indexed files were chosen by the operator: no pixel limit beyond Pillow's own bomb guard
        return decode_upload(data, Limits(max_bytes=len(data), max_pixels=2**62), what="indexed image")

    # ------------------------------------------------------------------ dense analyses
    def correspond(self, image_a: Image.Image, image_b: Image.Image) -> tuple[dict[str, Any], np.ndarray]:
        """Best-buddy correspondences (the function and settings of ``vitdense correspond``) → (JSON-ready
        record, side-by-side picture (H, W, 3) uint8)."""
        from ..correspond import draw_correspondences, find_correspondences

        cfg = self.config
        dense = self.extractor.at_stride(cfg.correspond_stride)
        with self.device_lock:
            result = find_correspondences(dense, image_a, image_b, num_pairs=cfg.correspond_pairs,
                                          load_size=cfg.correspond_load_size)
        shown = result.pairs
        picture = draw_correspondences(image_a, image_b, shown.points_a, shown.points_b)
        record = {"size_a": list(result.size_a), "size_b": list(result.size_b),
                  "coordinates": "pixels of the original images; (0, 0) is the centre of the top-left pixel",
                  "num_mutual_neighbours": result.num_mutual, "num_salient_buddies": len(result.buddies),
                  "message": result.message, "pairs": shown.to_records(),
                  "settings": {k: result.settings[k] for k in ("layer", "facet", "bin", "stride", "load_size",
                                                               "thresh", "num_pairs")},
                  "picture_size": [int(picture.shape[0]), int(picture.shape[1])]}
        return record, picture

    def _describe(self, key: str, image: Image.Image):
        from ..correspond import default_layer, describe_image

        cached = self.dense.get(key)
        if cached is not None:
            return cached
        cfg = self.config
        dense = self.extractor.at_stride(cfg.correspond_stride)
        with self.device_lock:
            desc, _, geom = describe_image(dense, image, cfg.correspond_load_size, default_layer(dense.depth),
                                           cfg.heat_facet, bin=False)
        value = (desc.float().cpu(), geom)
        self.dense.put(key, value)
        return value

    def heatmap(self, key_a: str, image_a: Image.Image, key_b: str, image_b: Image.Image,
                point: tuple[float, float]) -> tuple[dict[str, Any], np.ndarray]:
        """Cosine similarity of the descriptor at ``point`` (y, x) of A to every token of B (as ``vitdense
        inspect``), drawn over B beside A: (record, picture (H, W, 3) uint8). A marks the chosen point, B its
        most similar point."""
        from ..correspond import draw_correspondences
        from ..viz import heatmap, similarity_map

        desc_a, geom_a = self._describe(key_a, image_a)
        desc_b, geom_b = self._describe(key_b, image_b)
        y = min(max(point[0], 0.0), geom_a.size[0] - 1.0)
        x = min(max(point[1], 0.0), geom_a.size[1] - 1.0)
        token = int(geom_a.tokens(np.array([[y, x]]))[0])
        sim = similarity_map(desc_a, token, desc_b, geom_b.grid)  # (h, w)
        best = int(np.argmax(sim))
        heat = heatmap(sim, geom_b.size)
        base = np.asarray(image_b.convert("RGB"), dtype=np.float32)
        blended = (0.45 * base + 0.55 * heat).astype(np.uint8)
        pa = geom_a.pixels(np.array([token]))
        pb = geom_b.pixels(np.array([best]))
        picture = draw_correspondences(image_a, blended, pa, pb)
        record = {"point_a": {"y": round(float(pa[0, 0]), 2), "x": round(float(pa[0, 1]), 2)},
                  "best_b": {"y": round(float(pb[0, 0]), 2), "x": round(float(pb[0, 1]), 2)},
                  "similarity_min": round(float(sim.min()), 5), "similarity_max": round(float(sim.max()), 5),
                  "grid_b": list(geom_b.grid)}
        return record, picture

    # ------------------------------------------------------------------ status
    def health(self) -> dict[str, Any]:
        snap = self.snapshot
        return {"status": "ok", "images": len(snap), "generation": snap.generation}

    def stats(self) -> dict[str, Any]:
        snap = self.snapshot
        idx = snap.index
        b = self.batcher
        index = snap.summary()
        return {"images": len(snap), "outside_collection": len(snap.hidden) if snap.kind == "image-folder" else None,
                "generation": snap.generation, "dim": int(idx.vectors.shape[1]),
                "faiss": index["faiss"], "index": index, "descriptor": idx.descriptor.to_dict(),
                "backbone": {k: idx.backbone.get(k) for k in ("model", "model_arg", "weights_used", "fingerprint",
                                                               "patch_size", "embed_dim", "stride")},
                "device": str(self.extractor.device), "uptime_s": round(time.time() - self.started, 1),
                "queries_served": sum(v.count for v in self.latency.values()),
                "latency": {k: v.summary() for k, v in self.latency.items()},
                "batching": {"window_ms": self.config.window_s * 1000, "max_batch": b.max_batch,
                             "forward_passes": b.batches, "queries": b.batched, "largest_batch": b.largest,
                             "mean_batch": round(b.batched / b.batches, 2) if b.batches else None,
                             "forward_ms_per_query": (round(1000 * b.forward_s / b.batched, 1) if b.batched
                                                      else None)},
                "reloads": self.reloads, "reload_error": self.reload_error,
                "thumbnails_cached": len(self.thumbs.items)}


def upload_key(data: bytes) -> str:
    """Cache key of an uploaded image's dense descriptors."""
    return "upload:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def png_bytes(picture: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture).save(out, "PNG")
    return out.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
