"""Atomic file output: write to a temporary sibling, then rename over the target.

Why: every stage must survive being killed at any point; a reader either sees the old complete file or the new
complete file, never a half-written one, and a rerun simply overwrites.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``, on error remove it.

    Works for files and for directories (a directory target is replaced whole).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "x.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (d / "x.txt").read_text()
        'hello'
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix last so that drivers choosing a format by extension (GDAL, pyogrio) still work
    tmp = target.with_name(f".{target.stem}.tmp-{uuid.uuid4().hex[:8]}{''.join(target.suffixes)}")
    try:
        yield tmp
        if target.is_dir() and tmp.is_dir():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_if_changed(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text is written as UTF-8) to ``path`` atomically unless the file already holds exactly those
    bytes; then it is left alone, so a rerun keeps its bytes and modification time (and a hash of it stays valid).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.vrt"
        >>> _ = write_if_changed(p, "<VRT/>"); before = p.stat().st_mtime_ns
        >>> write_if_changed(p, b"<VRT/>").stat().st_mtime_ns == before
        True
    """
    path = Path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    with suppress(OSError):  # absent or unreadable: written below
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path

