"""Per-image results kept while a long command runs, so that an interrupted run continues where it stopped.

A :class:`ResumeStore` is a folder holding one NPZ per finished image and the settings they were computed
with (``settings.json``). An image is known by its file (resolved path, size and modification time), so
a renamed, edited or replaced file is computed again. A store opened with other settings than the kept
ones starts empty (the old entries are deleted, and :attr:`ResumeStore.changed` names what differs): a
rerun never mixes results of two settings. Commands delete the store once their outputs are written.

Used by ``vitdense extract`` (``OUT.npz.parts/``: every image's descriptors), ``vitdense cosegment`` /
``part-cosegment`` (``OUT/.resume/``: every image's descriptors and saliency; the clustering, a joint
analysis of all images, is redone) and ``vitdense propagate`` (``OUT/.resume/``: entries named by frame
number, see :meth:`ResumeStore.load`, since a video file's frames are not files).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import atomic_write

SETTINGS = "settings.json"


class ResumeStore:
    """Finished per-image arrays in ``folder``, valid for ``settings`` (a JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, settings: dict[str, Any]):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
        self.reused = 0
        self.changed: list[str] = []  # settings that differ from the kept entries' (they were deleted)
        if self.folder.is_dir():
            try:
                kept = json.loads((self.folder / SETTINGS).read_text())
            except (OSError, ValueError):
                kept = None
            if kept != self.settings:
                kept = kept if isinstance(kept, dict) else {}
                self.changed = sorted(k for k in set(kept) | set(self.settings) if kept.get(k) != self.settings.get(k))
                self.discard()

    def key(self, path: str | os.PathLike) -> str:
        st = os.stat(path)
        ident = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha1(ident.encode()).hexdigest()[:20]

    def get(self, path: str | os.PathLike) -> dict[str, np.ndarray] | None:
        """The kept arrays of ``path``, or None when it has none (or they cannot be read)."""
        try:
            arrays = self.load(self.key(path))
        except OSError:
            return None
        if arrays is not None:
            self.reused += 1
        return arrays

    def put(self, path: str | os.PathLike, **arrays: np.ndarray) -> None:
        """Keep ``path``'s arrays (atomically: an interruption leaves the entry whole or absent)."""
        self.save(self.key(path), **arrays)

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays of the entry called ``name`` (a key of :meth:`key`, or a caller's own name such as a
        frame number), or None when there is none or it cannot be read."""
        try:
            file = self.folder / f"{name}.npz"
            if not file.is_file():
                return None
            with np.load(file, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):
            return None

    def has(self, name: str) -> bool:
        return (self.folder / f"{name}.npz").is_file()

    def save(self, name: str, compress: bool = False, **arrays: np.ndarray) -> None:
        """Keep ``arrays`` as the entry ``name`` (atomically). ``compress``: for arrays that compress well
        (labels); descriptors barely do and time matters, so the default is uncompressed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / SETTINGS).is_file():
            text = json.dumps(self.settings, indent=2)
            atomic_write(self.folder / SETTINGS, lambda tmp: Path(tmp).write_text(text + "\n"))

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                (np.savez_compressed if compress else np.savez)(f, **arrays)

        atomic_write(self.folder / f"{name}.npz", write)

    def remove(self, name: str) -> None:
        """Delete the entry ``name`` (nothing happens when there is none)."""
        (self.folder / f"{name}.npz").unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.npz")) if self.folder.is_dir() else 0

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def notes(self) -> list[str]:
        """Lines for the user: kept results ignored because settings changed; finished images skipped."""
        lines = []
        if self.changed:
            lines.append(f"{self.folder}: kept results of an interrupted run had other settings "
                         f"({', '.join(self.changed)}): computing every image again")
        if self.reused:
            lines.append(f"resumed: skipped {self.reused} finished image(s) kept in {self.folder}")
        return lines

    def interrupted(self, what: str = "image(s)", n: int | None = None) -> KeyboardInterrupt:
        """The KeyboardInterrupt to raise when the command is interrupted: says what is kept and how to go on.
        ``n``: how many finished items are kept (default: the number of entries)."""
        n = len(self) if n is None else n
        if not n:
            return KeyboardInterrupt()
        return KeyboardInterrupt(f"kept {n} finished {what} in {self.folder}; run the same command again to "
                                 f"continue")
