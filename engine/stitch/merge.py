"""Merge polygon pieces across strip seams into one polygon per village, and measure each (DuckDB spatial).

Connected components of the seam pairs (``scipy.sparse.csgraph``) say which pieces form one village; DuckDB
unions each component (``ST_Union_Agg``, ordered by piece id so the result is reproducible), counts the tile cores
whose interior meets it (a spatial join against the core boxes), simplifies it, moves it from pixel coordinates into
the city CRS (``ST_Affine``), measures its area in an equal-area CRS (EPSG:6933) and reprojects it to EPSG:4326.
``ST_Transform`` is called with ``always_xy := true`` so every CRS is read as x/y (lon/lat), never in the
authority's axis order.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
from affine import Affine
from pyproj import CRS
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

EQUAL_AREA_CRS = "EPSG:6933"  # WGS 84 / NSIDC EASE-Grid 2.0 Global: equal-area, worldwide between +-86 deg

MERGE_SQL = """
WITH merged AS (
    SELECT comp, ST_Union_Agg(ST_GeomFromWKB(geometry) ORDER BY pid) AS geom
    FROM pieces GROUP BY comp
), cores AS (
    SELECT ST_MakeEnvelope(core_col_off, core_row_off, core_col_off + core_width, core_row_off + core_height) AS box
    FROM core_rows
), touched AS (
    SELECT m.comp, count(*) AS n_tiles
    FROM merged m JOIN cores c ON ST_Intersects(m.geom, c.box)
    WHERE NOT ST_Touches(m.geom, c.box)
    GROUP BY m.comp
), placed AS (
    SELECT m.comp, coalesce(t.n_tiles, 0) AS n_tiles,
           ST_Affine(ST_SimplifyPreserveTopology(ST_Normalize(m.geom), $tolerance), $a, $b, $d, $e, $xoff, $yoff) AS geom
    FROM merged m LEFT JOIN touched t USING (comp)
)
SELECT p.comp, p.n_tiles, s.pixels, s.prob_sum,
       ST_Area(ST_Transform(p.geom, $crs, $equal_area, always_xy := true)) AS area_m2,
       ST_AsWKB(ST_Normalize(ST_Transform(p.geom, $crs, 'EPSG:4326', always_xy := true))) AS geometry
FROM placed p JOIN sums s USING (comp)
WHERE NOT ST_IsEmpty(p.geom)
ORDER BY p.comp
"""
MERGED_SCHEMA = pa.schema([pa.field("comp", pa.int64()), pa.field("n_tiles", pa.int64()), pa.field("pixels", pa.int64()),
                           pa.field("prob_sum", pa.float64()), pa.field("area_m2", pa.float64()), pa.field("geometry", pa.binary())])


def components(n_pieces: int, pairs: np.ndarray) -> np.ndarray:
    """Per piece, the id of its component: the smallest piece id in it (so components sort by position).

    Example:
        >>> components(5, np.array([[0, 3], [3, 4]])).tolist()
        [0, 1, 2, 0, 0]
    """
    if n_pieces == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n_pieces, n_pieces))
    _, labels = connected_components(graph, directed=False)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return first[inverse].astype(np.int64)


def merge_pieces(con: duckdb.DuckDBPyConnection, pieces: pa.Table, pairs: np.ndarray, cores: pa.Table, transform: Affine,
                 crs: CRS, simplify_px: float = 1.0) -> pa.Table:
    """One row per village (:data:`MERGED_SCHEMA`; ``geometry`` WKB in EPSG:4326), in position order (``comp``).

    Args:
        con: DuckDB with the spatial extension (:func:`engine.db.connect`); a cursor of it does the work.
        pieces: :data:`engine.stitch.polygons.PIECES_SCHEMA` rows (pixel coordinates).
        pairs: ``(n, 2)`` piece ids that continue into each other across a seam.
        cores: ``core_col_off, core_row_off, core_width, core_height`` of the city's tiles (pixels).
        transform: the city grid's pixel-to-CRS affine; ``crs`` its CRS.
        simplify_px: Douglas-Peucker tolerance in pixels (topology preserving); 0 only drops collinear vertices.
    """
    comp = components(pieces.num_rows, pairs)
    _, first, inverse = np.unique(comp, return_index=True, return_inverse=True)
    sums = pa.table({
        "comp": pa.array(comp[first], pa.int64()),
        # summed here in piece order: reproducible to the last bit, unlike a parallel SQL sum of doubles
        "pixels": pa.array(np.bincount(inverse, weights=pieces["pixels"].to_numpy(), minlength=len(first)).astype(np.int64)),
        "prob_sum": pa.array(np.bincount(inverse, weights=pieces["prob_sum"].to_numpy(), minlength=len(first))),
    })
    con = con.cursor()  # its own registrations, so cities can be merged from several threads
    try:
        con.register("pieces", pieces.append_column("comp", pa.array(comp, pa.int64())))
        con.register("sums", sums)
        con.register("core_rows", cores)
        params = {"tolerance": float(simplify_px), "a": transform.a, "b": transform.b, "d": transform.d, "e": transform.e,
                  "xoff": transform.c, "yoff": transform.f, "crs": crs.to_string(), "equal_area": EQUAL_AREA_CRS}
        return con.execute(MERGE_SQL, params).to_arrow_table().cast(MERGED_SCHEMA)
    finally:
        con.close()
