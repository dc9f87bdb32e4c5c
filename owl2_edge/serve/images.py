"""The images of a request, as bytes: data: URLs and raw base64 always, file:// paths only under
the folders `--allow-path` names, http(s) URLs only with `--allow-remote-images` and then from
public addresses only (fetch.py). Each is held to the byte limit while it is read and to the
pixel limit from its header, before Owl2 decodes it.

The server never hands Owl2 a path: what a client names is read here, within the limits, and
Owl2 gets the bytes. Reading runs in a worker thread (a download may take seconds).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import stat
import urllib.parse
import warnings
from pathlib import Path

from PIL import Image

from owl2_edge.checks import display_path
from owl2_edge.serve.fetch import DownloadFailed, Fetcher, TooLarge
from owl2_edge.serve.limits import MiB, ApiError, Limits, bad_request

log = logging.getLogger("owl2_edge.serve")


class ImageReader:
    def __init__(self, limits: Limits, allow_paths: tuple[Path, ...] = (),
                 fetcher: Fetcher | None = None):
        self.limits = limits
        # Resolved once: a file:// path must resolve (symlinks followed) inside one of them.
        self.allow_paths = tuple(Path(os.path.realpath(p)) for p in allow_paths)
        self.fetcher = fetcher  # None: http(s) images are refused

    @property
    def allow_remote(self) -> bool:
        return self.fetcher is not None

    def read(self, source, param: str, label: str, deadline: float | None = None) -> bytes:
        """One image's bytes from a url string (or {"url": ...}), checked against the limits.
        `param`: the request field it came from (for the error object), `label`: which image it
        is, for messages ("image 2", "images[1]"); `deadline`: the request's, a monotonic time
        that a download must not outlast."""
        if isinstance(source, dict):
            source = source.get("url")
        if not isinstance(source, str) or not source:
            raise bad_request(f"{label}: an image must be a url string (data:, base64, file:// or "
                              f"http(s)://)", param=param)
        scheme = source.split(":", 1)[0].lower() if ":" in source[:12] else ""
        if scheme == "data":
            data = self._data_url(source, param, label)
        elif scheme == "file":
            data = self._file(source, param, label)
        elif scheme in ("http", "https"):
            data = self._remote(source, param, label, deadline)
        else:
            data = self._base64(source, param, label,
                                "neither a data:, file:// or http(s) URL nor base64")
        self._check_pixels(data, param, label)
        return data

    # -- the forms -------------------------------------------------------------------------------

    def _data_url(self, url: str, param: str, label: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header.lower():
            raise bad_request(f"{label}: only base64 data: URLs are read "
                              f"(data:image/png;base64,...)", param=param)
        return self._base64(payload, param, label, "the data: URL is not valid base64")

    def _base64(self, text: str, param: str, label: str, why: str) -> bytes:
        # Three bytes per four characters: refuse an oversized image before decoding it.
        if len(text) * 3 // 4 > self.limits.max_image_bytes + 3:
            raise self._too_many_bytes(param, label)
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{label}: {why}", param=param, code="invalid_image") from None
        if not data:
            raise bad_request(f"{label}: an empty image", param=param, code="invalid_image")
        if len(data) > self.limits.max_image_bytes:
            raise self._too_many_bytes(param, label)
        return data

    def _file(self, url: str, param: str, label: str) -> bytes:
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{label}: file:// URLs name this machine's files only", param=param)
        path = urllib.parse.unquote(parsed.path)
        if "\x00" in path or not path:
            raise bad_request(f"{label}: a file:// URL must name a file", param=param,
                              code="invalid_image")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(folder) for folder in self.allow_paths):
            allowed = "no folder is allowed" if not self.allow_paths else \
                "only under " + ", ".join(display_path(p) for p in self.allow_paths)
            raise bad_request(f"{label}: file:// paths are read only under the folders given "
                              f"with owl2 serve --allow-path ({allowed})", param=param,
                              code="path_not_allowed")
        name = display_path(path)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise bad_request(f"{label}: {name}: {e.strerror or e}", param=param,
                              code="invalid_image") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
                raise bad_request(f"{label}: {name}: not a regular file", param=param,
                                  code="invalid_image")
            if st.st_size > self.limits.max_image_bytes:
                raise self._too_many_bytes(param, label)
            return f.read(self.limits.max_image_bytes + 1)

    def _remote(self, url: str, param: str, label: str, deadline: float | None) -> bytes:
        if self.fetcher is None:
            raise bad_request(f"{label}: http(s) images are fetched only when the server runs with "
                              f"--allow-remote-images", param=param, code="remote_not_allowed")
        try:
            return self.fetcher.fetch(url, deadline)
        except TooLarge:
            raise self._too_many_bytes(param, label) from None
        except DownloadFailed as e:
            # One message whatever happened (refused address, closed port, timeout, HTTP
            # error), so that the answers map nothing of the network; the log has the reason.
            log.info("%s: %s: not downloaded: %s", label, url[:200], e)
            raise bad_request(f"{label}: the image could not be downloaded (this server fetches "
                              f"from public addresses only, within "
                              f"{self.limits.remote_timeout_s:g} s)", param=param,
                              code="image_download_failed") from None

    # -- the limits ------------------------------------------------------------------------------

    def _check_pixels(self, data: bytes, param: str, label: str) -> None:
        """Width x height from the header only. A file Pillow cannot open passes here: Owl2
        refuses it with its own message (ImageError) when it decodes it."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
        except Exception:  # Pillow's many decode failures: owl2_edge/image.py sorts them out
            return
        if width * height > self.limits.max_image_pixels:
            raise bad_request(f"{label}: {width}x{height} pixels is more than this server takes "
                              f"({self.limits.max_image_pixels:,} pixels)", param=param,
                              code="image_too_large")

    def _too_many_bytes(self, param: str, label: str) -> ApiError:
        return ApiError(413, f"{label}: the image is larger than this server takes "
                             f"({self.limits.max_image_bytes / MiB:g} MiB)", param=param,
                        code="image_too_large")


def count_image_parts(messages) -> int:
    """The image and clip parts of chat messages (image_url, video_url, input_video), counted before any is read (a request over the
    limit must not make the server download its first images)."""
    n = 0
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            n += sum(1 for part in content if isinstance(part, dict)
                     and part.get("type") in ("image_url", "video_url", "input_video"))
    return n
