"""Where a collection's images come from, and how they are cut into shards.

A *source* is a folder of images, a list of paths (a ``.txt`` file, one path a line, or a ``.parquet``
file with a ``path``/``url``/``id`` column), or a webdataset ``.tar`` shard as img2dataset writes it
(members ``KEY.jpg`` beside ``KEY.json`` / ``KEY.txt``). A *shard* is the unit of work and of resume:
a list of files (cut from folders and lists, ``shard_size`` files each) or one whole tar.

Every row gets a stable id that does not depend on row order: the resolved path of a file, or
``TAR::MEMBER`` for a tar member. The manifest records each source (:func:`record_sources`): its path and
the folder holding what it named, which is where ``vitdense serve`` may read the collection's files.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DataError
from ..io import IMAGE_SUFFIXES, natural_key

TAR_SEP = "::"


@dataclass(frozen=True)
class ShardSpec:
    """One shard to embed: ``kind`` "files" (``items`` are paths) or "tar" (``tar`` is the file)."""

    name: str
    kind: str
    items: tuple[str, ...] = ()
    tar: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "tar": self.tar, "count": len(self.items)}


@dataclass
class Record:
    """One row read from a shard: its id, the encoded image (None when it could not be read) and why."""

    id: str
    data: bytes | None
    reason: str = ""
    meta: dict = field(default_factory=dict)


def _list_file(path: Path) -> list[str]:
    """Paths named by a .txt (one a line) or .parquet (column path, url or id) list file."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: cannot read the Parquet list ({str(err).splitlines()[0]})") from None
        for column in ("path", "url", "id"):
            if column in table.column_names:
                return [str(v) for v in table.column(column).to_pylist() if v]
        raise DataError(f"{path}: a Parquet list needs a column named path, url or id "
                        f"(has {', '.join(table.column_names)})")
    base = path.parent
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [str((base / line).resolve()) if not os.path.isabs(line) else line
            for line in lines if line and not line.startswith("#")]


def expand_sources(sources: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """(image files, tar files) named by ``sources``; DataError for a source that does not exist."""
    files: list[str] = []
    tars: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                           key=natural_key)
            files += [str(p.resolve()) for p in found]
            tars += [str(p.resolve()) for p in sorted(path.rglob("*.tar"), key=natural_key)]
        elif path.is_file() and path.suffix.lower() == ".tar":
            tars.append(str(path.resolve()))
        elif path.is_file() and path.suffix.lower() in (".txt", ".parquet"):
            for item in _list_file(path):
                (tars if item.lower().endswith(".tar") else files).append(item)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(str(path.resolve()))
        else:
            raise DataError(f"{path}: not a folder, image, .tar shard or .txt/.parquet list of images")
    return files, tars


def common_folder(paths_lo: str, paths_hi: str) -> str:
    """The deepest folder holding every path whose string lies between ``lo`` and ``hi`` (their least and
    greatest: every such path starts with the common prefix of those two)."""
    prefix = os.path.commonprefix([paths_lo, paths_hi])
    folder = prefix[:prefix.rfind("/")] if "/" in prefix else ""
    return folder or "/"


def enclosing_folder(folders: Sequence[str]) -> str | None:
    """The deepest folder holding every one of ``folders`` (None for none)."""
    ends = [f.rstrip("/") + "/" for f in folders]  # a folder's own name kept: it is no file's name
    return common_folder(min(ends), max(ends)) if ends else None


def record_sources(sources: Sequence[str | os.PathLike]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """:func:`expand_sources`, and what the manifest records of each source: ``{"path": the source as given,
    made absolute (~ expanded, links kept), "folder": the deepest folder holding every file and tar it named
    by an absolute path (the paths the rows' ids hold), None when it named none (a list of URLs)}``."""
    files: list[str] = []
    tars: list[str] = []
    records: list[dict[str, Any]] = []
    for source in sources:
        named_files, named_tars = expand_sources([source])
        files += named_files
        tars += named_tars
        absolute = [p for p in named_files + named_tars if os.path.isabs(p)]
        records.append({"path": os.path.abspath(os.path.expanduser(source)),
                        "folder": common_folder(min(absolute), max(absolute)) if absolute else None})
    return files, tars, records


def plan_shards(files: Sequence[str], tars: Sequence[str], shard_size: int, start: int = 0) -> list[ShardSpec]:
    """Cut files into shards of ``shard_size`` (in the given order) and give each tar a shard of its own;
    shards are numbered from ``start``."""
    specs = []
    for i in range(0, len(files), shard_size):
        specs.append(ShardSpec(f"shard-{start + len(specs):05d}", "files", tuple(files[i:i + shard_size])))
    for tar in tars:
        specs.append(ShardSpec(f"shard-{start + len(specs):05d}", "tar", tar=tar))
    return specs


def read_records(spec: ShardSpec) -> Iterator[Record]:
    """The rows of a shard in order. Unreadable files give a Record with ``data=None`` and the reason; a
    truncated or corrupt tar ends with one such Record (id ``TAR::<truncated>``) after the members read."""
    if spec.kind == "files":
        for item in spec.items:
            try:
                with open(item, "rb") as f:
                    yield Record(item, f.read())
            except OSError as err:
                yield Record(item, None, f"cannot read ({err.strerror or err})")
        return
    yield from _read_tar(spec.tar)


def _read_tar(tar: str) -> Iterator[Record]:
    """Samples of a webdataset tar: members grouped by key (the name up to the first dot of its last part;
    webdataset writes a sample's members one after another); the image member is the sample, its .json /
    .txt members become metadata. Holds one sample in memory at a time."""
    key, record, meta, count = None, None, {}, 0
    try:
        with tarfile.open(tar, "r|*") as archive:  # streaming: never seeks, works on pipes
            for member in archive:
                if not member.isfile():
                    continue
                head, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                this = f"{head}/{stem}" if head else stem
                if this != key:
                    if record is not None:
                        record.meta, count = meta, count + 1
                        yield record
                    key, record, meta = this, None, {}
                data = archive.extractfile(member).read()
                if "." + ext.lower() in IMAGE_SUFFIXES:
                    record = Record(f"{tar}{TAR_SEP}{member.name}", data)
                elif ext.lower() in ("json", "txt"):
                    meta[ext.lower()] = data.decode("utf-8", "replace")
    except (tarfile.TarError, OSError, EOFError) as err:
        # the sample being read when the tar broke may be incomplete: it is not yielded
        yield Record(f"{tar}{TAR_SEP}<truncated>", None,
                     f"corrupt or truncated tar after {count} sample(s) ({str(err) or type(err).__name__})")
        return
    if record is not None:
        record.meta = meta
        yield record
