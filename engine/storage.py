"""Remote workspaces (``s3://``, ``gs://``) through a node-local mirror: read-through on demand, write-through on commit.

Why a mirror: every stage works on local paths (GDAL, DuckDB, Parquet writers and atomic renames all want them),
and on a cluster each node needs the same files. A workspace URI such as ``s3://bucket/geolink`` maps to the same
local folder on every node, ``<cache>/mirror/s3/bucket/geolink`` (``<cache>`` = ``$GEOLINK_CACHE_DIR`` or
``~/.cache/geolink-engine``). Code that reads a workspace file calls :func:`localize` first (it downloads the file
or folder when the local copy is missing or differs in size or time from the object store); code that wrote one
calls :func:`publish` (one PUT per file: an object appears whole or not at all, the store's form of temp + rename).
For a local workspace both are no-ops, so the single-machine path is unchanged.

The object store is the source of truth: a fresh node (or a driver restarted elsewhere) rebuilds what it needs
from it. S3-compatible servers (MinIO, Ceph, moto) are reached through ``AWS_ENDPOINT_URL``; credentials come
from the usual AWS variables. Rasters are not mirrored: rasterio reads ``s3://`` URIs through GDAL's ``/vsis3/``
with windowed range requests (:func:`gdal_env` sets the endpoint for GDAL).
"""

from __future__ import annotations

import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")
# settings (never secrets: those come from the node's own environment or instance role, and a runtime environment
# is visible in the Ray dashboard)
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "GEOLINK_CACHE_DIR", "AWS_S3_ENDPOINT",
            "AWS_HTTPS", "AWS_VIRTUAL_HOSTING")


class StorageError(OSError):
    """A remote object could not be read or written; the message names the URI."""


def is_remote(location: str | os.PathLike[str] | None) -> bool:
    """``True`` for ``s3://`` / ``gs://`` URIs (not for local paths or GDAL ``/vsi`` paths)."""
    if not isinstance(location, str) or "://" not in location:
        return False
    return location.split("://", 1)[0].lower() in REMOTE_SCHEMES


def cache_root() -> Path:
    return Path(os.environ.get("GEOLINK_CACHE_DIR") or Path.home() / ".cache" / "geolink-engine")


def _mirror_base() -> Path:
    return cache_root() / "mirror"


def mirror_path(uri: str) -> Path:
    """The local folder or file that stands for ``uri`` on every node (same path everywhere)."""
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise StorageError(f"{uri}: not a usable object-store location (need scheme://bucket/prefix without . or ..)")
    return _mirror_base().joinpath(scheme.lower(), *parts)


def uri_of(path: str | os.PathLike[str]) -> str | None:
    """The object-store URI a mirror path stands for; ``None`` for ordinary local paths."""
    try:
        rel = Path(path).resolve().relative_to(_mirror_base().resolve())
    except ValueError:
        return None
    scheme, *parts = rel.parts
    return f"{scheme}://{'/'.join(parts)}"


def workspace_root(workspace: str | os.PathLike[str]) -> Path:
    """The local root to work in: the path itself, or the mirror of a remote workspace (created)."""
    if is_remote(str(workspace)):
        root = mirror_path(str(workspace))
        root.mkdir(parents=True, exist_ok=True)
        return root
    return Path(workspace)


def local_path(location: str | os.PathLike[str]) -> Path:
    """A local path holding ``location``'s content: remote URIs are mirrored (downloaded if needed) first."""
    if is_remote(str(location)):
        return localize(mirror_path(str(location)))
    return localize(Path(location))


@lru_cache(maxsize=8)
def _filesystem(scheme: str, endpoint: str, region: str) -> pafs.FileSystem:
    if scheme == "s3":
        kwargs: dict = {"region": region or "us-east-1"}
        if endpoint:
            url = urlparse(endpoint)
            kwargs.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
        return pafs.S3FileSystem(**kwargs)
    return pafs.GcsFileSystem()


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path (``bucket/key``) for an object-store URI."""
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    fs = _filesystem("s3" if scheme == "s3" else "gs", endpoint if scheme == "s3" else "", region)
    return fs, rest.strip("/")


def gdal_path(location: str | os.PathLike[str]) -> str:
    """The name GDAL opens ``location`` by inside a file it reads (a VRT's ``SourceFilename``), where rasterio's URI
    translation does not reach: ``s3://b/k`` -> ``/vsis3/b/k``, ``gs://`` -> ``/vsigs/``, ``http(s)://`` ->
    ``/vsicurl/...``; a mirror path of a remote workspace -> its object's name; a local path -> absolute.

    Example:
        >>> gdal_path("s3://bucket/imagery/wuhan.tif"), gdal_path("https://x.org/a.tif")
        ('/vsis3/bucket/imagery/wuhan.tif', '/vsicurl/https://x.org/a.tif')
    """
    text = str(location)
    if text.startswith("/vsi"):
        return text
    scheme, sep, rest = text.partition("://")
    if sep:
        prefix = {"s3": "/vsis3/", "gs": "/vsigs/", "gcs": "/vsigs/", "az": "/vsiaz/"}.get(scheme)
        if prefix:
            return prefix + rest
        if scheme in ("http", "https"):
            return "/vsicurl/" + text
        raise StorageError(f"{text}: GDAL cannot read the {scheme}:// scheme")
    uri = uri_of(text)
    return gdal_path(uri) if uri else str(Path(text).absolute())


def gdal_env() -> dict[str, str]:
    """GDAL settings for ``/vsis3/`` reads from ``AWS_ENDPOINT_URL`` (an S3-compatible server), else nothing."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    url = urlparse(endpoint)
    return {"AWS_S3_ENDPOINT": url.netloc, "AWS_HTTPS": "YES" if url.scheme == "https" else "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}


def raster_env() -> "rasterio.Env":  # noqa: F821 (rasterio is imported inside: callers may not need it)
    """A rasterio environment that leaves object-store credentials to GDAL (it reads the ``AWS_*`` variables itself).

    Why: with AWS keys in the environment and boto3 installed, every bare ``rasterio.open`` builds a boto3 session:
    tens of milliseconds each, and not safe across threads (stitch threads hung on it). Enter it once per task or
    thread that opens rasters.
    """
    import rasterio
    from rasterio.session import DummySession

    return rasterio.Env(session=DummySession(), **gdal_env())


def configure_process() -> None:
    """Make this process's GDAL reach the S3 endpoint (sets unset GDAL variables only); called at entry points."""
    for key, value in gdal_env().items():
        os.environ.setdefault(key, value)


def ray_env_vars() -> dict[str, str]:
    """The storage settings every Ray worker needs (passed in the runtime environment; credentials are not)."""
    configure_process()
    return {k: os.environ[k] for k in ENV_KEYS if os.environ.get(k)}


def object_stamp(uri: str) -> str:
    """``size:mtime_ns`` of one object (its identity for input hashes); error names the URI when it is missing."""
    fs, key = filesystem(uri)
    info = _info(fs, key, uri)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: no such object")
    return f"{info.size}:{info.mtime_ns}"


def _info(fs: pafs.FileSystem, key: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(key)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot be reached: {exc}") from exc


def _remote_files(fs: pafs.FileSystem, key: str) -> dict[str, pafs.FileInfo]:
    """Every object under the folder ``key``, by its path relative to it."""
    return {i.path[len(key) + 1:]: i for i in fs.get_file_info(pafs.FileSelector(key, recursive=True)) if i.type == pafs.FileType.File}


def _fresh(local: Path, info: pafs.FileInfo) -> bool:
    if not local.is_file():
        return False
    st = local.stat()
    return st.st_size == info.size and (info.mtime_ns is None or abs(st.st_mtime_ns - info.mtime_ns) < 1_000_000_000)


def _download(fs: pafs.FileSystem, info: pafs.FileInfo, local: Path, uri: str) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.dl-{uuid.uuid4().hex[:8]}")
    try:
        with fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        if info.mtime_ns is not None:
            os.utime(tmp, ns=(info.mtime_ns, info.mtime_ns))
        os.replace(tmp, local)
    except OSError as exc:
        raise StorageError(f"{uri}: download failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def localize(path: str | os.PathLike[str], only_if_missing: bool = False) -> Path:
    """Make a mirror path's local copy match the object store (a file, or a folder with everything under it).

    Objects gone from the store are removed locally, so ``is_file``/``glob`` then tell the truth.
    ``only_if_missing``: keep an existing local file (for files this node itself keeps newer, e.g. the ledger).
    Ordinary local paths are returned unchanged.
    """
    path = Path(path)
    uri = uri_of(path)
    if uri is None or (only_if_missing and path.exists()):
        return path
    fs, key = filesystem(uri)
    info = _info(fs, key, uri)
    if info.type == pafs.FileType.File:
        if not _fresh(path, info):
            _download(fs, info, path, uri)
    elif info.type == pafs.FileType.Directory:
        remote = _remote_files(fs, key)
        for rel, item in remote.items():
            if not _fresh(path / rel, item):
                _download(fs, item, path / rel, f"{uri}/{rel}")
        if path.is_dir():
            for local in [p for p in path.rglob("*") if p.is_file()]:
                if local.relative_to(path).as_posix() not in remote and not local.name.startswith("."):
                    local.unlink()
    elif path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    return path


def _upload(fs: pafs.FileSystem, local: Path, key: str, uri: str) -> None:
    try:
        with open(local, "rb") as src, fs.open_output_stream(key) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except OSError as exc:
        raise StorageError(f"{uri}: upload failed: {exc}") from exc
    info = fs.get_file_info(key)
    if info.mtime_ns is not None:  # the local copy now counts as fresh
        os.utime(local, ns=(info.mtime_ns, info.mtime_ns))


def publish(path: str | os.PathLike[str], keep_local: bool = True) -> None:
    """Write a mirror path's local state to the object store: a file is uploaded; a folder is uploaded file by file
    and objects under it that no longer exist locally are deleted; a path gone locally is deleted remotely.

    Hidden temporaries (``.name...``) are never uploaded. ``keep_local=False`` drops a file's local copy once
    uploaded (bulk outputs a worker node will not read again). Ordinary local paths: nothing to do.
    """
    path = Path(path)
    uri = uri_of(path)
    if uri is None:
        return
    fs, key = filesystem(uri)
    if path.is_file():
        _upload(fs, path, key, uri)
        if not keep_local:
            path.unlink()
        return
    info = _info(fs, key, uri)
    remote = {}
    if info.type == pafs.FileType.Directory:
        remote = _remote_files(fs, key)
    elif info.type == pafs.FileType.File:
        fs.delete_file(key)
    if path.is_dir():
        local = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)}
        for rel, file in local.items():
            if rel not in remote or not _fresh(file, remote[rel]):
                _upload(fs, file, f"{key}/{rel}", f"{uri}/{rel}")
        for rel in remote.keys() - local.keys():
            fs.delete_file(f"{key}/{rel}")
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir_contents(key, missing_dir_ok=True)


def list_files(folder: str | os.PathLike[str], suffix: str = "", recursive: bool = False) -> list[Path]:
    """Files under ``folder`` (directly, or at any depth) ending in ``suffix``, as local (mirror) paths, without
    downloading them: for a remote workspace the object store is listed, not this node's partial copy."""
    folder = Path(folder)
    uri = uri_of(folder)
    if uri is None:
        if not folder.is_dir():
            return []
        found = folder.rglob(f"*{suffix}") if recursive else folder.glob(f"*{suffix}")
        return sorted(p for p in found if p.is_file() and not p.name.startswith("."))
    fs, key = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True, recursive=recursive))
    return sorted(folder / i.path[len(key) + 1:] for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                  and not Path(i.path).name.startswith("."))


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file here and, for a mirror path, in the object store too."""
    path = Path(path)
    path.unlink(missing_ok=True)
    uri = uri_of(path)
    if uri is not None:
        fs, key = filesystem(uri)
        if fs.get_file_info(key).type == pafs.FileType.File:
            fs.delete_file(key)


def move_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Replace folder ``dst`` by ``src`` (both in one workspace). Locally an atomic rename; in an object store a
    server-side copy of each object then a delete of the source (no rename there), so callers write their
    completion marker after this returns."""
    from engine.atomic import atomic_path

    src, dst = Path(src), Path(dst)
    src_uri, dst_uri = uri_of(src), uri_of(dst)
    if src_uri is None or dst_uri is None:
        with atomic_path(dst) as tmp:
            os.replace(src, tmp)
        return
    fs, src_key = filesystem(src_uri)
    _, dst_key = filesystem(dst_uri)
    fs.delete_dir_contents(dst_key, missing_dir_ok=True)
    for item in fs.get_file_info(pafs.FileSelector(src_key, recursive=True)):
        if item.type == pafs.FileType.File:
            fs.copy_file(item.path, f"{dst_key}/{item.path[len(src_key) + 1:]}")
    fs.delete_dir_contents(src_key, missing_dir_ok=True)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)  # the stale local copy; readers localize the new one
