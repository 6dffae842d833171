"""The embeddings folder: Parquet shards, their done-markers, and the collection's manifest.

    EMB/manifest.json              backbone identity + weights fingerprint, descriptor settings, dimension,
                                   dtype, the shard plan with each shard's status and row count, the
                                   sources (path as given, folder of what it named; absent in folders
                                   embedded before they were recorded: unknown)
    EMB/inputs/shard-NNNNN.txt     the files of a file shard (fixed when the shard is planned)
    EMB/shard-NNNNN.parquet        rows: id, sha256, meta (JSON), vector (D' float32)
    EMB/shard-NNNNN.patches.parquet  with --patch-descriptors: per row id, grid h, w, and the patch tokens
                                   (h, w, D) as float16 bytes (written before the shard's Parquet file)
    EMB/shard-NNNNN.done.json      written after the Parquet file: rows, skipped rows (id + reason), time

A shard is done when its Parquet file and its done-marker both exist (img2dataset's rule); a rerun embeds
only the shards that are not. Each file is written atomically (tmp + rename), the marker last.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..backbones import atomic_write
from ..errors import ConfigError, DataError
from ..descriptors import DescriptorConfig
from .sources import ShardSpec, enclosing_folder, plan_shards

if TYPE_CHECKING:  # embed imports torch; reading shards and building an index do not need it
    from .embed import ShardRows

MANIFEST_VERSION = 1


def _pyarrow():
    """pyarrow and pyarrow.parquet; ConfigError naming the extra when they are not installed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("embedding shards need pyarrow: pip install 'vitdense[ray]'") from None
    return pa, pq


def shard_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / f"{name}.parquet"


def marker_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / f"{name}.done.json"


def patches_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / f"{name}.patches.parquet"


def is_done(root: str | os.PathLike, name: str) -> bool:
    return shard_path(root, name).is_file() and marker_path(root, name).is_file()


def write_shard(root: str | os.PathLike, name: str, rows: ShardRows, seconds: float) -> dict[str, Any]:
    """Write a shard's Parquet file, then its done-marker (both atomically); return the marker's content."""
    pa, pq = _pyarrow()
    dim = rows.vectors.shape[1]
    if rows.patches is not None:  # before the shard's own file: a done shard always has its patches
        grids = rows.patches
        patches = pa.table({"id": pa.array(rows.ids, pa.string()),
                            "h": pa.array([g.shape[0] for g in grids], pa.int32()),
                            "w": pa.array([g.shape[1] for g in grids], pa.int32()),
                            "patches": pa.array([np.ascontiguousarray(g, "<f2").tobytes() for g in grids],
                                                pa.large_binary())},
                           metadata={"dtype": "float16", "dim": str(grids[0].shape[2] if grids else 0)})
        atomic_write(patches_path(root, name), lambda tmp: pq.write_table(patches, tmp))
    flat = pa.array(np.ascontiguousarray(rows.vectors, np.float32).ravel(), pa.float32())
    table = pa.table({"id": pa.array(rows.ids, pa.string()), "sha256": pa.array(rows.sha256, pa.string()),
                      "meta": pa.array(rows.meta, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(flat, dim)})
    atomic_write(shard_path(root, name), lambda tmp: pq.write_table(table, tmp))
    marker = {"shard": name, "rows": len(rows.ids), "dim": dim, "skipped": [list(s) for s in rows.skipped],
              "seconds": round(seconds, 3), "host": socket.gethostname(), "pid": os.getpid(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(marker_path(root, name), lambda tmp: Path(tmp).write_text(json.dumps(marker) + "\n"))
    return marker


def read_patches(root: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """One shard's patch descriptors (``vitdense embed --patch-descriptors``): id → (h, w, D) float16."""
    _, pq = _pyarrow()
    path = patches_path(root, name)
    try:
        table = pq.read_table(path)
        dim = int(table.schema.metadata[b"dim"])
        cols = {c: table.column(c).to_pylist() for c in ("id", "h", "w", "patches")}
        return {i: np.frombuffer(b, "<f2").reshape(h, w, dim)
                for i, h, w, b in zip(cols["id"], cols["h"], cols["w"], cols["patches"])}
    except FileNotFoundError:
        raise DataError(f"{path}: no patch descriptors (embedded without --patch-descriptors)") from None
    except Exception as err:  # pyarrow raises several types for bad files
        raise DataError(f"{path}: cannot read the patch descriptors ({str(err).splitlines()[0]}); delete the "
                        f"shard's files and re-run `vitdense embed`") from None


def read_marker(root: str | os.PathLike, name: str) -> dict[str, Any]:
    return json.loads(marker_path(root, name).read_text())


def read_shard(root: str | os.PathLike, name: str, columns: Sequence[str] = ("id", "vector")) -> dict[str, Any]:
    """Columns of one shard: "vector" as (N, D') float32, the others as lists; DataError when unreadable."""
    _, pq = _pyarrow()
    path = shard_path(root, name)
    try:
        table = pq.read_table(path, columns=list(columns))
    except Exception as err:  # pyarrow raises several types for bad files
        raise DataError(f"{path}: cannot read the shard ({str(err).splitlines()[0]}); delete it and its "
                        f".done.json and re-run `vitdense embed`") from None
    out: dict[str, Any] = {}
    for column in columns:
        if column == "vector":
            arr = table.column("vector").combine_chunks()
            dim = arr.type.list_size
            out["vector"] = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32,
                                                                                                 copy=False)
        else:
            out[column] = table.column(column).to_pylist()
    return out


# ============================================================================ manifest

def merge_sources(recorded: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``recorded`` followed by the sources of ``new`` it lacks; a source in both keeps its place, its folder
    the deepest one holding both folders (a folder that has gained images elsewhere since)."""
    out = {s["path"]: dict(s) for s in recorded}
    for s in new:
        have = out.setdefault(s["path"], dict(s))
        have["folder"] = enclosing_folder([f for f in (have["folder"], s["folder"]) if f])
    return list(out.values())


@dataclass
class Collection:
    """An embeddings folder: its settings and shard plan (see the module doc)."""

    root: Path
    backbone: dict[str, Any]
    descriptor: DescriptorConfig
    dim: int
    shards: list[ShardSpec]
    patch_descriptors: bool = False  # each shard also keeps its rows' patch tokens (float16)
    sources: list[dict[str, Any]] | None = None  # {"path", "folder"} per source; None: not recorded (older)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def pending(self) -> list[ShardSpec]:
        return [s for s in self.shards if not is_done(self.root, s.name)]

    def done_rows(self) -> list[tuple[str, int]]:
        """(shard name, rows) of the done shards, in plan order."""
        return [(s.name, read_marker(self.root, s.name)["rows"]) for s in self.shards if is_done(self.root, s.name)]

    def write_manifest(self) -> dict[str, Any]:
        """Write manifest.json (atomically) with every shard's current status; return it."""
        shards = []
        for spec in self.shards:
            entry = spec.to_dict()
            if is_done(self.root, spec.name):
                marker = read_marker(self.root, spec.name)
                entry.update(status="done", rows=marker["rows"], skipped=len(marker["skipped"]))
            else:
                entry.update(status="pending", rows=None, skipped=None)
            shards.append(entry)
        manifest = {"version": MANIFEST_VERSION, "backbone": self.backbone, "descriptor": self.descriptor.to_dict(),
                    "dim": self.dim, "dtype": "float32", "patch_descriptors": self.patch_descriptors,
                    "rows": sum(s["rows"] or 0 for s in shards),
                    "complete": all(s["status"] == "done" for s in shards), "shards": shards,
                    "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.sources is not None:
            manifest["sources"] = self.sources
        text = json.dumps(manifest, indent=1)
        atomic_write(self.manifest_path, lambda tmp: Path(tmp).write_text(text + "\n"))
        return manifest

    # ------------------------------------------------------------------ opening
    @classmethod
    def load(cls, root: str | os.PathLike) -> "Collection":
        """Open an embeddings folder; DataError naming it when it is not one or is corrupt."""
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise DataError(f"{root}: not a vitdense embeddings folder (no manifest.json); make one with "
                            f"`vitdense embed`")
        try:
            meta = json.loads(path.read_text())
            if meta.get("version") != MANIFEST_VERSION:
                raise DataError(f"{path}: manifest version {meta.get('version')}, this vitdense reads "
                                f"{MANIFEST_VERSION}")
            shards = []
            for s in meta["shards"]:
                items: tuple[str, ...] = ()
                if s["kind"] == "files":
                    items = tuple((root / "inputs" / f"{s['name']}.txt").read_text().splitlines())
                shards.append(ShardSpec(s["name"], s["kind"], items, s.get("tar")))
            sources = meta.get("sources")
            if sources is not None:
                sources = [{"path": str(s["path"]), "folder": s["folder"]} for s in sources]
            return cls(root, meta["backbone"], DescriptorConfig.from_dict(meta["descriptor"]), int(meta["dim"]),
                       shards, bool(meta.get("patch_descriptors", False)), sources)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise DataError(f"{path}: corrupt manifest ({err})") from None

    @classmethod
    def open_or_create(cls, root: str | os.PathLike, files: Sequence[str], tars: Sequence[str],
                       backbone: dict[str, Any], descriptor: DescriptorConfig, dim: int,
                       shard_size: int, patch_descriptors: bool = False,
                       sources: Sequence[dict[str, Any]] | None = None) -> "Collection":
        """The collection at ``root`` with ``files`` and ``tars`` planned into shards.

        A new folder is planned from scratch. An existing one must have the same backbone (weights
        fingerprint, stride) and descriptor settings (ConfigError otherwise: a collection never mixes
        vectors of two settings); its plan is kept and inputs it does not hold yet become new shards.
        ``sources``: what :func:`~vitdense.collection.sources.record_sources` records of the sources named;
        added to those the manifest records (:func:`merge_sources`). Unknown sources stay unknown (no
        "sources" in the manifest): those of a folder embedded before they were recorded, and those of
        new shards planned without ``sources``.
        """
        root = Path(root)
        files = list(dict.fromkeys(files))  # a file named twice is one row
        tars = list(dict.fromkeys(tars))
        if (root / "manifest.json").exists():
            coll = cls.load(root)
            coll.check(backbone, descriptor)
            if coll.patch_descriptors != patch_descriptors:
                have = "with" if coll.patch_descriptors else "without"
                raise ConfigError(f"{coll.manifest_path}: the collection was embedded {have} --patch-descriptors; "
                                  f"use the same setting or another --out")
            planned = {i for s in coll.shards for i in s.items}
            planned_tars = {s.tar for s in coll.shards if s.tar}
            new = plan_shards([f for f in files if f not in planned], [t for t in tars if t not in planned_tars],
                              shard_size, start=len(coll.shards))
            if sources is None:
                if new:  # the new shards' sources are unknown, hence the collection's
                    coll.sources = None
            elif coll.sources is not None:
                coll.sources = merge_sources(coll.sources, sources)
        else:
            if root.exists() and any(root.iterdir()):
                raise DataError(f"{root}: folder exists and is not a vitdense embeddings folder; choose an empty "
                                f"or new --out")
            coll = cls(root, backbone, descriptor, dim, [], patch_descriptors,
                       None if sources is None else [dict(s) for s in sources])
            new = plan_shards(files, tars, shard_size)
        for spec in new:
            if spec.kind == "files":
                text = "\n".join(spec.items) + "\n"
                atomic_write(root / "inputs" / f"{spec.name}.txt", lambda tmp, t=text: Path(tmp).write_text(t))
        coll.shards += new
        coll.write_manifest()
        return coll

    def check(self, backbone: dict[str, Any], descriptor: DescriptorConfig) -> None:
        """ConfigError when the backbone or descriptor settings are not the collection's."""
        own = self.backbone
        if backbone["fingerprint"] != own["fingerprint"] or backbone["stride"] != own["stride"]:
            raise ConfigError(
                f"{self.manifest_path}: the collection was embedded with model '{own['model']}' (stride "
                f"{own['stride']}, weights fingerprint {own['fingerprint']}), not '{backbone['model']}' (stride "
                f"{backbone['stride']}, fingerprint {backbone['fingerprint']}); use its backbone or another --out")
        ours, theirs = self.descriptor.to_dict(), descriptor.to_dict()
        diff = [f"{k}: collection {ours[k]!r} vs requested {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]
        if diff:
            raise ConfigError(f"{self.manifest_path}: descriptor settings differ from the collection's "
                              f"({'; '.join(diff)}); use its settings or another --out")
