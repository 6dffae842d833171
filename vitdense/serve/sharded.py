"""A sharded index (``vitdense index --embeddings``) served without a table of all its ids in memory.

Ids. The public id of row r (the global row: the faiss id, the row's shard offset + its row in the shard)
is ``r-CHECK``, CHECK the 16 hex digits of :func:`vitdense.serve.security.image_id` of the collection's id
string of that row (its file path, or ``TAR::MEMBER``). A request's id is parsed (``[1-9][0-9]*|0``, a
dash, 16 hex digits; nothing else is ever looked up), its row must lie in 0..N-1, and its check must equal
that of the id string the row holds in the generation being served; otherwise 404. So an id maps to its
row without a global table; knowing or counting row numbers gives nothing without the row's id string (a
64-bit check per row to guess); and an id of an earlier build whose row now holds another image is a 404,
never that other image (an id stays valid across rebuilds that keep its row). Result pages name only rows
of the index, so no id ever reaches a file outside it.

Row id strings are read from the shards' Parquet files on first use, one shard's "id" column at a time,
and kept for the ``id_shards`` shards used last (LRU): start-up reads no id, and memory is bounded by the
LRU, not by N.

Files. A folder or list row is its file (served under the rules of :func:`~vitdense.serve.security.servable_path`);
a tar row ``TAR::MEMBER`` is read from its tar (the tar's path is the one the manifest recorded for the row's
shard; the tar itself obeys the same rules), at the member's offset, for regular members of uncompressed tars
(compressed tars and members above :data:`MAX_MEMBER_BYTES`: 404/413). A tar's member list is read once and
kept for the last ``tar_cache`` tars, keyed by the tar's inode, size and mtime (a rewritten tar is listed again).

Allowed roots: unless ``--root`` names the folder, files are served from the common folder of every
embedded file and tar: of the folders the manifest records for its sources (``vitdense embed`` records
them), or, for an embeddings folder made before sources were recorded, of every planned file (inputs/*.txt,
streamed: min and max strings only) and tar (manifest), with a warning. Rows outside it are never named in
an answer.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import LRU
from ..collection.index import ShardedIndex
from ..collection.shards import read_shard, shard_path
from ..collection.sources import TAR_SEP, common_folder, enclosing_folder
from ..errors import DataError
from .security import IndexedFile, RequestError, image_id, inside, servable_path

LOG = logging.getLogger("vitdense.serve")

ROW_ID = re.compile(r"(0|[1-9][0-9]{0,14})-([0-9a-f]{16})")
MAX_MEMBER_BYTES = 256 << 20  # a tar member larger than this is not an image we serve (413)


def row_id(row: int, id_string: str) -> str:
    """The public id of global row ``row`` holding the collection's id ``id_string`` (see module doc)."""
    return f"{row}-{image_id(id_string)}"


def planned_folder(embeddings: Path, shards: list[dict[str, Any]]) -> str | None:
    """Common folder of the files (inputs/NAME.txt, one path a line, streamed) and tars the manifest planned;
    None when none is an absolute path. For a manifest that does not record its sources: reads every list."""
    lo = hi = None
    for spec in shards:
        if spec.get("tar"):
            lines = [spec["tar"]]
        else:
            try:
                lines = (embeddings / "inputs" / f"{spec['name']}.txt").read_text().splitlines()
            except OSError:
                continue
        lines = [line for line in lines if line.startswith("/")]
        if lines:
            a, b = min(lines), max(lines)
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    return None if lo is None else common_folder(lo, hi)


@dataclass(frozen=True)
class Roots:
    """The folder whose files may be served and what it was derived from (reused by a reload when the
    embeddings' manifest did not change)."""

    folder: str | None
    manifest_stamp: tuple[int, int, int]
    given: str | None


class TarMembers:
    """Member lists of tars (name → (offset of its data, size)), kept for the last ``size`` tars."""

    def __init__(self, size: int = 16):
        self.cache = LRU(size)

    def locate(self, tar: Path, member: str) -> IndexedFile:
        """The servable bytes of ``member`` in ``tar`` (already checked by servable_path): 404 when there is no
        such regular member, or the tar is compressed; 413 when the member is larger than MAX_MEMBER_BYTES."""
        try:
            fd = os.open(tar, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise RequestError(404, "image no longer on disk") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            state = (st.st_ino, st.st_size, st.st_mtime_ns)
            key = (str(tar), state)
            members = self.cache.get(key)
            if members is None:
                members = self._list(f, tar)
                self.cache.put(key, members)
        where = members.get(member)
        if where is None:
            raise RequestError(404, "image no longer in its tar")
        if where[1] > MAX_MEMBER_BYTES:
            raise RequestError(413, f"image of {where[1]} bytes inside its tar exceeds {MAX_MEMBER_BYTES >> 20} MB")
        return IndexedFile(tar, os.path.splitext(member)[1].lower(), state, where[0], where[1])

    @staticmethod
    def _list(f, tar: Path) -> dict[str, tuple[int, int]]:
        try:
            with tarfile.open(fileobj=f, mode="r:") as archive:  # uncompressed only: members at fixed offsets
                return {m.name: (m.offset_data, m.size) for m in archive.getmembers()
                        if m.isreg() and not m.issparse()}
        except tarfile.ReadError:
            LOG.warning("%s: not an uncompressed tar; its images are not served", tar)
            raise RequestError(404, "image inside a tar that cannot be read at random (compressed or corrupt)") \
                from None
        except (tarfile.TarError, OSError, EOFError):
            raise RequestError(404, "image inside a corrupt tar") from None


@dataclass(frozen=True)
class ShardedSnapshot:
    """One loaded generation of a sharded index (the interface of :class:`vitdense.serve.service.Snapshot`).

    ids: the id strings of the last shards used (LRU: shard index → list); tars: shard index → the tar the
    manifest recorded for it (None for a file shard); collection: the folder outside which nothing is served.
    """

    index: ShardedIndex
    tars: tuple[str | None, ...]
    roots: Roots
    stamp: tuple[int, int, int]
    loaded_at: float
    ids: LRU
    members: TarMembers = field(default_factory=TarMembers)
    kind = "sharded"

    @property
    def collection(self) -> str | None:
        return self.roots.folder

    @property
    def generation(self) -> int:
        return int(self.index.meta["generation"])

    @property
    def hidden(self) -> frozenset[int]:  # not listed in advance: rows outside are dropped as results come
        return frozenset()

    def __len__(self) -> int:
        return int(self.index.meta["count"])

    # ------------------------------------------------------------------ rows
    def shard_of(self, row: int) -> int:
        return int(np.searchsorted(self.index.vectors.offsets, row, side="right") - 1)

    def shard_ids(self, s: int) -> list[str]:
        """The collection's ids of shard ``s`` (read on first use, kept for the last ``id_shards`` shards)."""
        ids = self.ids.get(s)
        if ids is None:
            ids = read_shard(self.index.embeddings, self.index.shard_names[s], ["id"])["id"]
            self.ids.put(s, ids)
        return ids

    def id_string(self, row: int) -> str:
        """The collection's id of a global row."""
        s = self.shard_of(row)
        return self.shard_ids(s)[row - int(self.index.vectors.offsets[s])]

    def id_strings(self, rows: np.ndarray) -> dict[int, str]:
        """Id strings of many rows, each shard's ids fetched once (rows of a result list span shards in score
        order: fetching row by row could evict and re-read a shard within one answer)."""
        rows = np.asarray(rows, np.int64)
        rows = rows[rows >= 0]
        shards = np.searchsorted(self.index.vectors.offsets, rows, side="right") - 1
        out: dict[int, str] = {}
        for s in np.unique(shards):
            ids = self.shard_ids(int(s))
            start = int(self.index.vectors.offsets[s])
            out.update((int(r), ids[int(r) - start]) for r in rows[shards == s])
        return out

    def public_id(self, row: int) -> str:
        return row_id(row, self.id_string(row))

    def row(self, id_: str) -> int:
        """Row of a public id; RequestError 404 for anything that is not an id of this generation."""
        match = ROW_ID.fullmatch(id_) if isinstance(id_, str) else None
        if match is None or int(match.group(1)) >= len(self):
            raise RequestError(404, "no such image")
        row = int(match.group(1))
        if image_id(self.id_string(row)) != match.group(2) or not self.servable(row):
            raise RequestError(404, "no such image")
        return row

    def name(self, row: int) -> str:
        return self.id_string(row).rpartition("/")[2]

    def _tar_member(self, row: int, text: str | None = None) -> tuple[str, str] | None:
        """(tar, member) of a row of a tar shard, None for a file row; 404 for an id that does not name a
        member of the tar the manifest recorded. ``text``: the row's id string when known."""
        tar = self.tars[self.shard_of(row)]
        if tar is None:
            return None
        text = self.id_string(row) if text is None else text
        if not text.startswith(tar + TAR_SEP):
            raise RequestError(404, "no such image")
        return tar, text[len(tar) + len(TAR_SEP):]

    def servable(self, row: int, text: str | None = None) -> bool:
        """Whether a row's file (or tar) lies inside the collection folder as recorded (no disk access)."""
        if self.collection is None:
            return False
        text = self.id_string(row) if text is None else text
        try:
            where = self._tar_member(row, text)
        except RequestError:
            return False
        return inside(where[0] if where else text, self.collection)

    def vector(self, row: int) -> np.ndarray:
        return self.index.vectors[np.array([row])][0]

    def search(self, vector: np.ndarray, k: int, exclude: int | None = None
               ) -> list[tuple[float, int, str, str]]:
        """Top-k (score, row, public id, name) of a (D',) descriptor through :meth:`ShardedIndex.search`
        (its scores and order); rows outside the collection and ``exclude`` left out (asking faiss for more
        when they cost places)."""
        ask = k + (exclude is not None)
        for _ in range(5):
            scores, rows = self.index.search(np.asarray(vector, np.float32)[None], ask)
            texts = self.id_strings(rows[0])
            hits = [(float(s), int(r), row_id(int(r), texts[int(r)]), texts[int(r)].rpartition("/")[2])
                    for s, r in zip(scores[0], rows[0])
                    if r >= 0 and r != exclude and self.servable(int(r), texts[int(r)])]
            if len(hits) >= k or (rows[0] < 0).any() or ask >= len(self):
                break
            ask *= 4
        return hits[:k]

    # ------------------------------------------------------------------ files
    def file(self, id_: str) -> IndexedFile:
        """The servable image of an id: its file, or its member of a tar (404 when not servable)."""
        row = self.row(id_)
        where = self._tar_member(row)
        if where is None:
            path = servable_path(self.id_string(row), self.collection)
            st = path.stat()
            return IndexedFile(path, path.suffix.lower(), (st.st_size, st.st_mtime_ns))
        tar = servable_path(where[0], self.collection)
        return self.members.locate(tar, where[1])

    def summary(self) -> dict[str, Any]:
        meta = self.index.meta
        return {"kind": "sharded", "faiss": self.index.choice.kind, "factory": self.index.choice.factory,
                "nprobe": self.index.choice.nprobe, "rerank": self.index.rerank, "shards": len(self.tars),
                "id_shards_cached": len(self.ids.items), "built": meta.get("built")}


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def open_sharded(root: str | os.PathLike, stamp: tuple[int, int, int], collection: str | os.PathLike | None = None,
                 previous: Any = None, id_shards: int = 32) -> ShardedSnapshot:
    """Open a sharded index for serving: DataError (one line) when its embeddings folder is gone or lacks a
    shard of the index. ``previous``: the snapshot served until now (its roots are reused when the
    embeddings' manifest has not changed: the fallback folder scans every planned path)."""
    idx = ShardedIndex(root)
    emb = idx.embeddings
    manifest_path = emb / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{root}: its embeddings folder {emb} is missing or moved (no manifest.json); put it back "
                        f"or rebuild the index with `vitdense index --embeddings`")
    try:
        manifest = json.loads(manifest_path.read_text())
        planned = {s["name"]: s for s in manifest["shards"]}
        sources = manifest.get("sources")  # None: embedded before sources were recorded
        source_folders = None if sources is None else [s["folder"] for s in sources if s["folder"]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{manifest_path}: corrupt manifest ({err})") from None
    missing = [n for n in idx.shard_names if n not in planned or not shard_path(emb, n).is_file()]
    if missing:
        raise DataError(f"{emb}: {len(missing)} shard(s) of the index are missing (first: {missing[0]}.parquet); "
                        f"the embeddings changed since `vitdense index --embeddings`: rebuild the index")
    tars = tuple(planned[n].get("tar") or None for n in idx.shard_names)
    given = None if collection is None else os.path.realpath(collection)
    mstamp = _stamp(manifest_path)
    old = getattr(previous, "roots", None)
    if given is not None:
        roots = Roots(given, mstamp, given)
    elif isinstance(old, Roots) and old.given is None and old.manifest_stamp == mstamp:
        roots = old
    elif source_folders is not None:
        folder = enclosing_folder(source_folders)
        LOG.info("%s: serving files under %s, the folder of the embeddings' %d source(s) (set --root to narrow "
                 "it)", root, folder, len(sources))
        roots = Roots(folder, mstamp, None)
    else:
        folder = planned_folder(emb, list(planned.values()))
        LOG.warning("%s: the embeddings folder does not record its source folders (embedded before vitdense "
                    "recorded them); serving files under %s (set --root to narrow it)", root, folder)
        roots = Roots(folder, mstamp, None)
    return ShardedSnapshot(idx, tars, roots, stamp, time.time(), LRU(max(1, id_shards)))
