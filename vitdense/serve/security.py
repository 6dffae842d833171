"""What a request may name and send: image ids (never paths), upload limits, the access token.

A client names an indexed image only by its id, a hash of the path the index recorded; the id is checked
against a fixed pattern and looked up in the loaded index, so `..`, absolute paths and URL-encoded tricks
find nothing (404); a sharded index's ids are a row and a check of it (:mod:`vitdense.serve.sharded`). A
file is served only when its real path (symlinks resolved at request time) is still the path the index
recorded and lies inside the collection folder: a file later replaced by a symlink to somewhere else, or
indexed through a symlink that leads out of the collection, is not served.

Uploads are read in memory only (nothing is written to disk, not even a temporary file), refused above
``max_bytes`` while they arrive (413), and decoded only when the header's pixel count is within
``max_pixels`` (413: a decompression bomb is refused before its pixels are allocated). Empty bodies,
non-images and truncated files give 422.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import warnings
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import AsyncIterator

from PIL import Image, UnidentifiedImageError

from ..errors import VitdenseError
from ..io import to_rgb

ID_PATTERN = re.compile(r"[0-9a-f]{16}")
# Decoders an upload may reach: the common photo formats (Pillow has dozens; fewer decoders, less to attack).
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RequestError(VitdenseError):
    """A request the service refuses: ``status`` is the HTTP status, the message one line for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Upload limits. max_bytes: body size (413 above); max_pixels: width × height of an upload (413 above)."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000


def image_id(path: str) -> str:
    """The public id of an indexed image: 16 hex digits of a hash of its recorded path (stable across
    reloads, reveals nothing of the path)."""
    return hashlib.blake2b(path.encode(), digest_size=8).hexdigest()


def check_id(value: str) -> str:
    """``value`` when it has the form of an id, else RequestError 404 (nothing else is ever looked up)."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise RequestError(404, "no such image")
    return value


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` lies in ``folder`` (both taken as given: resolve them first)."""
    try:
        Path(path).relative_to(folder)
        return True
    except ValueError:
        return False


def servable_path(recorded: str, collection: str | None) -> Path:
    """The file of an indexed image, or RequestError 404 when it is gone, is not a regular file, is reached
    through a symlink that was not there when it was indexed, or lies outside the ``collection`` folder."""
    real = Path(os.path.realpath(recorded))
    if str(real) != recorded or (collection is not None and not inside(real, collection)):
        raise RequestError(404, "no such image")
    if not real.is_file():
        raise RequestError(404, "image no longer on disk")
    return real


def read_file_bytes(path: Path) -> bytes:
    """Bytes of a regular file opened without following a final symlink (raced replacement → 404)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        raise RequestError(404, "image no longer on disk") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class IndexedFile:
    """An indexed image that may be served: a regular file (``path``), or a member of an uncompressed tar
    (``path`` the tar, ``offset``/``size`` the member's bytes in it). ``suffix``: the image's own suffix
    (".jpg"); ``state``: changes whenever the file on disk does (a cache key)."""

    path: Path
    suffix: str
    state: tuple
    offset: int | None = None
    size: int | None = None

    def read(self) -> bytes:
        """The image's bytes, read without following a final symlink (404 when the file went away or, for a
        tar member, when the tar changed since its members were listed)."""
        if self.offset is None:
            return read_file_bytes(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise RequestError(404, "image no longer on disk") from None
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self.state:
                raise RequestError(404, "image no longer on disk (its tar changed)")
            data = os.pread(fd, self.size, self.offset)
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise RequestError(404, "image no longer on disk (its tar is cut short)")
        return data


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, max_bytes: int) -> bytes:
    """The request body, read in memory; RequestError 413 as soon as it (or its Content-Length) exceeds
    ``max_bytes``, 422 when it is empty."""
    limit_mb = max_bytes / 2**20
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise RequestError(413, f"upload of {int(declared)} bytes exceeds --max-upload-mb {limit_mb:g}")
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > max_bytes:
            raise RequestError(413, f"upload exceeds --max-upload-mb {limit_mb:g}")
    if not buf:
        raise RequestError(422, "empty body: send an image")
    return bytes(buf)


def form_parts(body: bytes, content_type: str) -> dict[str, tuple[bytes, str | None]]:
    """Parts of a multipart/form-data body by field name → (content, file name or None for a text field),
    parsed in memory; the first part of a name wins."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        raise RequestError(422, "malformed multipart body")
    parts: dict[str, tuple[bytes, str | None]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name and name not in parts:
            parts[name] = (part.get_payload(decode=True) or b"", part.get_filename())
    return parts


def decode_upload(data: bytes, limits: Limits, what: str = "upload") -> Image.Image:
    """An uploaded image as RGB (:func:`vitdense.io.to_rgb`); RequestError 413 above ``limits.max_pixels`` (checked on the header, before
    decoding), 422 for empty data, non-images and truncated or corrupt files."""
    if not data:
        raise RequestError(422, f"{what}: empty")
    try:
        with warnings.catch_warnings():
            # our own pixel limit is checked below; Pillow's bomb check is left on as a second guard
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
                width, height = im.size
                if width * height > limits.max_pixels:
                    raise RequestError(413, f"{what}: image of {width}x{height} pixels exceeds the limit of "
                                            f"{limits.max_pixels} pixels (--max-pixels)")
                im.load()
                return to_rgb(im)  # as every command reads a file: upright, 16-bit scaled, alpha on white
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, f"{what}: image has too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        raise RequestError(422, f"{what}: not an image ({', '.join(UPLOAD_FORMATS)} accepted)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RequestError(422, f"{what}: corrupt or truncated image ({first})") from None


def token_ok(given: str | None, token: str | None) -> bool:
    """Whether a request carries the service's token (always true when the service has none)."""
    if token is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def check_bind(host: str, token: str | None, open_access: bool) -> None:
    """A bind beyond this machine needs --token or an explicit --open (VitdenseError otherwise)."""
    from ..errors import ConfigError

    if host not in LOOPBACK and token is None and not open_access:
        raise ConfigError(f"--host {host}: binding beyond this machine needs --token SECRET (clients send "
                          f"'Authorization: Bearer SECRET'), or --open to serve anyone who can reach it")
