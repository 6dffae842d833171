"""Which photo may be used for what: one place for the train / eval / reserved rules.

Every image that vitdense gathers from packages has a stable key, and the first hex digit of the key's
SHA-1 decides its split, so the rule needs no list and no state, and it holds for files added later:

* Tux Paint stamps, keyed by their path under the ``stamps/`` folder (``"animals/birds/hen.png"``):
  digits 0-3 → ``"reserved"`` (never used by anything: no evaluation, no pretraining, no tests, not even
  looked at when checking lists by eye; kept back for a later, untouched test set), 4-7 → ``"eval"``,
  8-f → ``"train"``.
* every other photo (wallpapers, GCompris photos, scikit-image samples), keyed by
  ``"PACKAGE/relative/path/in/package"`` (``"skimage/astronaut"``): digits 0-3 → ``"eval"``, else
  ``"train"``.

The evaluation set (:mod:`vitdense.evalset`) uses only ``"eval"`` images for what it scores (queries,
backgrounds, pairs, videos; ``"train"`` ones only as the k-NN bank); pretraining sets use only
``"train"`` ones.
"""
from __future__ import annotations

import hashlib

SPLITS = ("train", "eval", "reserved")


def _first_digit(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[0]


def stamp_split(relpath: str) -> str:
    """``"reserved"``, ``"eval"`` or ``"train"`` for a Tux Paint stamp path relative to ``stamps/``."""
    digit = _first_digit(relpath)
    if digit in "0123":
        return "reserved"
    return "eval" if digit in "4567" else "train"


def is_reserved_stamp(relpath: str) -> bool:
    """True for the stamps that nothing may use (a quarter of them, by :func:`stamp_split`)."""
    return stamp_split(relpath) == "reserved"


def photo_split(key: str) -> str:
    """``"eval"`` or ``"train"`` for any other photo, keyed ``"PACKAGE/relative/path/in/package"``."""
    return "eval" if _first_digit(key) in "0123" else "train"
