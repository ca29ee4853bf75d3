"""A local static file server for a run's products: HTTP range requests, no path out of its folder.

Why the standard library's ``http.server`` with a small handler of our own rather than ``SimpleHTTPRequestHandler``
or a web framework: ``SimpleHTTPRequestHandler`` answers no ``Range`` header (PMTiles reads its archive by byte
ranges, so the map would not load), lists folders, and follows symlinks out of its root; a framework (Starlette,
aiohttp) would add a dependency for what is about forty lines here. The handler:

- serves only regular files under ``root`` after resolving symlinks (a link that leads out is refused), never
  hidden names (``.`` prefix: the atomic writers' temporary files) and never a folder listing;
- decodes the URL once, then refuses any ``..`` segment, backslash or NUL (``%2e%2e``, ``%2f`` and ``%5c`` included);
- answers one ``bytes=`` range with ``206`` (several ranges: the whole file, which RFC 9110 allows);
- binds to 127.0.0.1 unless the caller names another host (:func:`make_server` then warns).

:class:`StaticHandler` is the base of the labelling server too (``engine.web.label``), which adds its JSON API.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import urllib.parse
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("engine.web")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CHUNK = 1 << 16
TYPES = {".pmtiles": "application/octet-stream", ".geojson": "application/geo+json", ".js": "text/javascript",
         ".mjs": "text/javascript", ".css": "text/css", ".json": "application/json", ".html": "text/html; charset=utf-8",
         ".png": "image/png", ".md": "text/markdown; charset=utf-8", ".csv": "text/csv; charset=utf-8"}
# nothing from outside this server: scripts, styles, tiles, images and workers from 'self' (MapLibre starts its
# workers from a blob: URL and decodes images through blob: and data: URLs)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; worker-src 'self' blob:; child-src 'self' blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def resolve_under(root: Path, url_path: str) -> Path | None:
    """The file under ``root`` that ``url_path`` names (query and fragment ignored), or ``None`` when the path
    leaves ``root`` (``..``, encoded slashes, a symlink leading out), names a hidden file, or is malformed.

    >>> import tempfile; r = Path(tempfile.mkdtemp()).resolve(); _ = (r / "a.txt").write_text("x")
    >>> resolve_under(r, "/a.txt") == r / "a.txt", resolve_under(r, "/..%2fetc/passwd"), resolve_under(r, "/%2e%2e/x")
    (True, None, None)
    """
    path = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path, errors="strict")
    if "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith(".") for p in parts):
        return None
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, *parts))
    if real != root_real and os.path.commonpath([real, root_real]) != root_real:
        return None  # a symlink inside the folder that leads out of it
    return Path(real)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """``(start, end)`` inclusive of one satisfiable ``bytes=`` range; ``None`` for no (or an ignored) range;
    ``False`` when the range cannot be satisfied (answer 416).

    >>> parse_range("bytes=0-9", 100), parse_range("bytes=90-", 100), parse_range("bytes=-5", 100), parse_range("bytes=200-", 100)
    ((0, 9), (90, 99), (95, 99), False)
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:  # several ranges, another unit, or garbage: the whole file (RFC 9110 lets a server ignore Range)
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else False
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return False
    return start, end


class StaticHandler(BaseHTTPRequestHandler):
    """GET and HEAD of the files under ``root`` (see the module docstring); everything else is refused."""

    server_version = "geolink-engine"
    root: Path = Path(".")

    def __init__(self, *args, root: Path, **kwargs) -> None:
        self.root = Path(root).resolve()
        super().__init__(*args, **kwargs)

    # -- requests --------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_file(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_file(head=True)

    def send_file(self, head: bool) -> None:
        try:
            path = resolve_under(self.root, self.path)
        except UnicodeDecodeError:
            path = None
        if path is not None and path.is_dir():
            path = path / "index.html"
        if path is None or not path.is_file():
            self.send_error_text(HTTPStatus.NOT_FOUND, "not found")
            return
        size = path.stat().st_size
        span = parse_range(self.headers.get("Range"), size)
        if span is False:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = span if span else (0, size - 1)
        length = max(end - start + 1, 0)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
        self.send_header("Content-Type", content_type(path))
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_common_headers()
        self.end_headers()
        if head or length == 0:
            return
        with path.open("rb") as fh:
            fh.seek(start)
            left = length
            while left > 0:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def send_common_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)

    def send_error_text(self, status: HTTPStatus, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)  # requests go to the log, not the console


def content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    return TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def is_local_host(host: str) -> bool:
    return host in LOCAL_HOSTS


def make_server(root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0,
                handler: type[StaticHandler] = StaticHandler, **handler_kwargs) -> ThreadingHTTPServer:
    """A threading server of ``handler`` over ``root`` (``port=0``: a free port; read ``server.server_address``).

    A host other than the loopback one is allowed (``--host``), with a warning in the log: anyone who can reach
    the machine can then read the products (and, for ``label``, write that run's labels).
    """
    if not is_local_host(host):
        log.warning("serving on %s: every machine that can reach this one can read (and for `label`, write) it", host)
    server = ThreadingHTTPServer((host, port), partial(handler, root=Path(root), **handler_kwargs))
    server.daemon_threads = True
    return server


def server_url(server: ThreadingHTTPServer, path: str = "/") -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in str(host) else host
    return f"http://{host}:{port}{path}"
