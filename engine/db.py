"""Embedded DuckDB with the spatial extension, loaded without network.

Why: there is no network for ``INSTALL spatial``; the ``duckdb-extension-spatial`` wheel (pinned to the duckdb
version) ships the extension binary, which is loaded by path when the normal ``LOAD spatial`` fails.
"""

from __future__ import annotations

from pathlib import Path

import duckdb


def spatial_extension_path() -> Path:
    """Path of the spatial extension binary shipped by the ``duckdb-extension-spatial`` package."""
    import duckdb_extension_spatial

    root = Path(duckdb_extension_spatial.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    found = sorted(root.glob("*/spatial.duckdb_extension")) + sorted(root.glob("spatial.duckdb_extension"))
    if not found:
        raise RuntimeError(
            f"no spatial extension for duckdb {duckdb.__version__} under {root}: install the matching "
            f"duckdb-extension-spatial (pip install 'duckdb-extension-spatial=={duckdb.__version__}')"
        )
    return found[0]


def connect(database: str = ":memory:", threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open DuckDB with the spatial extension loaded.

    Example:
        >>> con = connect()
        >>> con.execute("SELECT ST_Area(ST_GeomFromText('POLYGON((0 0,2 0,2 2,0 2,0 0))'))").fetchone()[0]
        4.0
    """
    con = duckdb.connect(database)
    if threads is not None:
        con.execute("SET threads = ?", [threads])
    try:
        con.execute("LOAD spatial")
    except duckdb.Error:
        con.load_extension(str(spatial_extension_path()))
    return con
