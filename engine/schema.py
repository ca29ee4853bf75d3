"""Every data contract of the engine, in one place, as pyarrow schemas plus the checks applied where data enters.

Why here: each stage reads what an earlier stage (or a user) wrote; keeping the schemas together means a
contract changes in one file and every reader checks the same thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

# --- identifiers -------------------------------------------------------------------------------------------
CITY_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
"""City slugs become directory names: lowercase ascii, digits, ``_`` and ``-``; no dots, slashes or spaces."""

SPLITS: tuple[str, ...] = ("train", "val", "test", "map")
OSM_KINDS: tuple[str, ...] = ("point", "line", "polygon")

# --- land-use classes (reference polygons and the synthetic truth raster) -------------------------------------
LANDUSE_CLASSES: tuple[str, ...] = (
    "nodata",  # 0: outside the AOI
    "road",  # 1: carriageway between blocks
    "urban_village",  # 2
    "formal_residential",  # 3
    "commercial",  # 4
    "industrial",  # 5
    "institutional",  # 6
    "green",  # 7: parks and other vegetated open space
    "water",  # 8
    "farmland",  # 9
    "vacant",  # 10: bare or construction land
)
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(LANDUSE_CLASSES)}
BUILT_UP_CLASSES: tuple[str, ...] = (
    "urban_village",
    "formal_residential",
    "commercial",
    "industrial",
    "institutional",
)

BUILT_UP_LABEL = "built_up"  # the map class of built-up land that is not a UV, in label sets that lump it (``builtup``)

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "binary": ("other", "urban_village"),
    "builtup": ("other", "urban_village", BUILT_UP_LABEL),
    "landuse": ("other", "urban_village", "formal_residential", "commercial", "industrial", "institutional", "green", "water",
                "farmland", "vacant"),
}
"""The class sets a model predicts (``--classes``); index 0 is always ``other``."""


def is_built_up(name: str) -> bool:
    """Whether a map or land-use class counts as built-up land: the one definition (UV share = UV / built-up).

    Built-up land is every class in :data:`BUILT_UP_CLASSES` (urban villages, formal residential, commercial,
    industrial, institutional) and the lumped map class :data:`BUILT_UP_LABEL`; roads, green, water, farmland and
    vacant land are not.

    >>> [c for c in LABEL_SETS["builtup"] if is_built_up(c)]
    ['urban_village', 'built_up']
    """
    return name in BUILT_UP_CLASSES or name == BUILT_UP_LABEL


def built_up_definition(classes: tuple[str, ...] | list[str]) -> dict:
    """What a run's classes say about built-up land, as written into ``run.json`` and the STAC collection.

    ``known`` is False when the classes cannot tell built-up land from the rest (a binary UV model): then no UV
    share can be measured from the map, and ``note`` says so and what to do.

    >>> built_up_definition(("other", "urban_village"))["known"]
    False
    """
    members = [c for c in classes if is_built_up(c)]
    known = any(c != "urban_village" for c in members)
    note = ("" if known else f"the model's classes {list(classes)} do not separate built-up land from the rest, so built-up area "
            "and UV share are not measured from the map; map with a model trained with --classes builtup or landuse")
    return {"classes": members, "definition": list(BUILT_UP_CLASSES) + [BUILT_UP_LABEL], "known": known, "note": note}


def label_lookup(classes: tuple[str, ...]) -> dict[str, int]:
    """Reference land-use class name -> index in ``classes`` (a model's label set), for rasterising labels.

    A class of the set maps to itself; with the lumped :data:`BUILT_UP_LABEL`, every built-up land-use class other
    than ``urban_village`` maps to it. Classes not in the result are ``other`` (index 0).

    >>> label_lookup(LABEL_SETS["builtup"])["industrial"], label_lookup(LABEL_SETS["binary"]).get("industrial")
    (2, None)
    """
    lookup = {name: i for i, name in enumerate(classes)}
    if BUILT_UP_LABEL in lookup:
        for name in BUILT_UP_CLASSES:
            lookup.setdefault(name, lookup[BUILT_UP_LABEL])
    return lookup

# --- schemas -------------------------------------------------------------------------------------------------
CATALOG_SCHEMA = pa.schema(
    [
        pa.field("city", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("imagery", pa.string(), nullable=False),
        pa.field("osm", pa.string(), nullable=False),
        pa.field("aoi", pa.string()),  # WKT polygon in EPSG:4326, or a path to a vector file
        pa.field("reference", pa.string()),
        pa.field("split", pa.string()),
        pa.field("buildings", pa.string()),  # optional footprints (GeoParquet/GeoPackage/GeoJSON, any CRS); else OSM's
        pa.field("zoom", pa.string()),  # MBTiles / XYZ tile caches: the zoom level to read (e.g. 18)
        pa.field("asset", pa.string()),  # STAC Item imagery: the asset key to read (default: see engine.imagery_sources)
        pa.field("bands", pa.string()),  # 1-based band numbers read as the model's R,G,B (e.g. "3,2,1"); default: the model's
        pa.field("radiometry", pa.string()),  # auto | uint8 | percentile:LO,HI | range:MIN,MAX (engine.model_input)
        pa.field("population", pa.string()),  # optional truth raster: residents per cell (regression labels, issue 20)
        pa.field("co2", pa.string()),  # optional truth raster: CO2 emission proxy per cell (regression labels)
        pa.field("vintage", pa.string()),  # optional date of the imagery (e.g. 2018): city + vintage is unique (issue 22)
    ]
)
CATALOG_REQUIRED: tuple[str, ...] = ("city", "region", "imagery", "osm")

BUILDINGS_SCHEMA = pa.schema(
    [
        pa.field("building_id", pa.int64(), nullable=False),  # 1..n in source order (parts of a multipolygon in turn)
        pa.field("height_m", pa.float64()),  # metres above ground; null when the source does not say
        pa.field("levels", pa.float64()),  # floors above ground; null when the source does not say
        pa.field("geometry", pa.binary(), nullable=False),  # WKB Polygon, EPSG:4326
    ]
)
"""A city's building footprints as ``engine.buildings`` reads them from a catalog file or from OSM."""

POPULATION_BUILDINGS_SCHEMA = pa.schema(
    [
        pa.field("building_id", pa.int64()),  # the building's id in the city's buildings file; null: not in the file
        pa.field("land_use", pa.string(), nullable=False),  # the land use of its block (LANDUSE_CLASSES)
        pa.field("floor_area_m2", pa.float64(), nullable=False),  # footprint x true floors
        pa.field("population", pa.float64(), nullable=False),  # residents (0 in non-residential buildings)
        pa.field("x", pa.float64(), nullable=False),  # footprint centroid in the city's CRS: the cell it counts in
        pa.field("y", pa.float64(), nullable=False),
    ]
)
"""A synthetic city's residents per building (``population_buildings.parquet``): every drawn building standing on
imagery, including those its buildings file misses; their sum is the ``population.tif`` total."""

OSM_FEATURES_SCHEMA = pa.schema(
    [
        pa.field("osm_id", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("tags", pa.map_(pa.string(), pa.string())),
        pa.field("geometry", pa.binary(), nullable=False),  # WKB, EPSG:4326
    ]
)

REFERENCE_SCHEMA = pa.schema(
    [
        pa.field("class", pa.string(), nullable=False),
        pa.field("block_id", pa.int64()),
        pa.field("geometry", pa.binary(), nullable=False),  # WKB, EPSG:4326
    ]
)


class SchemaError(ValueError):
    """A table does not match its contract; the message names the source and every mismatch."""


@dataclass(frozen=True)
class FieldProblem:
    field: str
    message: str


def schema_problems(schema: pa.Schema, expected: pa.Schema, required: tuple[str, ...] | None = None) -> list[FieldProblem]:
    """Compare ``schema`` with ``expected`` field by field.

    Args:
        schema: the schema of the data that arrived.
        expected: the contract.
        required: names that must be present; defaults to every field of ``expected``. Other expected fields
            are checked for type only when present.

    Returns:
        One problem per missing field or type mismatch (an empty list when the data conforms).

    Example:
        >>> schema_problems(pa.schema([("kind", pa.int32())]), OSM_FEATURES_SCHEMA, required=("kind",))
        [FieldProblem(field='kind', message='type int32, expected string')]
    """
    required = tuple(expected.names) if required is None else required
    problems: list[FieldProblem] = []
    for field in expected:
        if field.name not in schema.names:
            if field.name in required:
                problems.append(FieldProblem(field.name, "missing column"))
            continue
        got = schema.field(field.name).type
        if not _compatible(got, field.type):
            problems.append(FieldProblem(field.name, f"type {got}, expected {field.type}"))
    return problems


def check_schema(table: pa.Table, expected: pa.Schema, source: str, required: tuple[str, ...] | None = None) -> pa.Table:
    """Raise :class:`SchemaError` naming ``source`` unless ``table`` matches ``expected``; return it cast to it.

    Example:
        >>> t = pa.table({"osm_id": [1], "kind": ["point"], "tags": pa.array([[("a", "b")]],
        ...     pa.map_(pa.string(), pa.string())), "geometry": [b"\\x01"]})
        >>> check_schema(t, OSM_FEATURES_SCHEMA, "example").num_rows
        1
    """
    problems = schema_problems(table.schema, expected, required)
    if problems:
        detail = "; ".join(f"{p.field}: {p.message}" for p in problems)
        raise SchemaError(f"{source}: does not match the contract ({detail})")
    columns = [n for n in expected.names if n in table.column_names]
    return table.select(columns).cast(pa.schema([expected.field(n) for n in columns]))


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if got == want:
        return True
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got) or pa.types.is_dictionary(got)
    if pa.types.is_binary(want):
        return pa.types.is_binary(got) or pa.types.is_large_binary(got)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_map(want):
        return pa.types.is_map(got)
    return False


# --- tiles ---------------------------------------------------------------------------------------------------
TILE_INDEX_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),  # city + tile size/overlap + grid row/col: stable
        pa.field("city", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("crs", pa.string(), nullable=False),  # the imagery's CRS (all pixel/bounds columns are in it)
        pa.field("grid_row", pa.int32(), nullable=False),
        pa.field("grid_col", pa.int32(), nullable=False),
        pa.field("tile_size_px", pa.int32(), nullable=False),
        pa.field("overlap_px", pa.int32(), nullable=False),
        pa.field("window_col_off", pa.int32(), nullable=False),  # window = what the model sees, halo included
        pa.field("window_row_off", pa.int32(), nullable=False),
        pa.field("window_width", pa.int32(), nullable=False),
        pa.field("window_height", pa.int32(), nullable=False),
        pa.field("core_col_off", pa.int32(), nullable=False),  # core = the pixels this tile owns in the mosaic
        pa.field("core_row_off", pa.int32(), nullable=False),
        pa.field("core_width", pa.int32(), nullable=False),
        pa.field("core_height", pa.int32(), nullable=False),
        pa.field("minx", pa.float64(), nullable=False),  # window bounds in the city CRS
        pa.field("miny", pa.float64(), nullable=False),
        pa.field("maxx", pa.float64(), nullable=False),
        pa.field("maxy", pa.float64(), nullable=False),
        pa.field("lon_min", pa.float64(), nullable=False),  # window bounds in EPSG:4326
        pa.field("lat_min", pa.float64(), nullable=False),
        pa.field("lon_max", pa.float64(), nullable=False),
        pa.field("lat_max", pa.float64(), nullable=False),
        pa.field("imagery", pa.string(), nullable=False),
        pa.field("input_hash", pa.string(), nullable=False),  # imagery content + window + tile graph content
    ]
)


def _tile_graph_schema() -> pa.Schema:
    from geolink_model.osm_graph import EDGE_TYPES, NODE_TYPES

    fields = [pa.field("tile_id", pa.string(), nullable=False), pa.field("graph_version", pa.int32(), nullable=False),
              pa.field("tokens_per_node", pa.int32(), nullable=False)]
    for kind in NODE_TYPES:
        fields += [
            pa.field(f"{kind}_osm_id", pa.list_(pa.int64())),
            pa.field(f"{kind}_tokens", pa.list_(pa.int32())),  # row-major (n, tokens_per_node), 0 = padding
            pa.field(f"{kind}_geom", pa.list_(pa.float32())),  # row-major (n, F) per GEOM_FEATURES[kind]
        ]
    fields += [pa.field(edge_column(et), pa.list_(pa.int32())) for et in EDGE_TYPES]  # sources then targets
    fields.append(pa.field("graph_hash", pa.string(), nullable=False))
    return pa.schema(fields)


def edge_column(edge_type: tuple[str, str, str]) -> str:
    """Column holding one relation's edges: ``edge__line__crosses__polygon``."""
    return "edge__" + "__".join(edge_type)


TILE_GRAPH_SCHEMA = _tile_graph_schema()


# --- predictions (one row per tile per mapping run) ------------------------------------------------------------
PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("city", pa.string(), nullable=False),
        pa.field("input_hash", pa.string(), nullable=False),  # the tile index's input_hash the prediction was made from
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("n_classes", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),  # the tile's window (halo included)
        pa.field("width", pa.int32(), nullable=False),
        # uint8 (n_classes - 1, height, width) row-major: round(p * 255) of classes 1..K-1; class 0 = 255 - the rest
        pa.field("probs", pa.binary(), nullable=False),
    ]
)

# --- embedding parts (one row per tile per embedding pass: runs/<run>/embeddings/<mode>_<level>/) -----------------
EMBEDDING_LEVELS = ("tile", "patch")  # one vector per tile (pooled over its core) or the tile's whole patch grid
EMBEDDING_PARTS_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("city", pa.string(), nullable=False),
        pa.field("input_hash", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("n_vectors", pa.int32(), nullable=False),  # 1 (level tile) or grid_size**2 (level patch, row-major)
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("vectors", pa.binary(), nullable=False),  # float32 little-endian (n_vectors, dim) row-major
    ]
)


def embeddings_schema(dim: int, level: str) -> pa.Schema:
    """The embeddings product ``products/<run>/embeddings/<mode>_<level>.parquet`` (GeoParquet, EPSG:4326; every
    column in docs/PRODUCTS.md): ``level`` is ``tile``, ``patch`` or ``points`` (the ``--points`` lookup)."""
    if level not in (*EMBEDDING_LEVELS, "points"):
        raise ValueError(f"level {level!r}: use one of {(*EMBEDDING_LEVELS, 'points')}")
    points = level == "points"
    fields = [pa.field("point_id", pa.string(), nullable=False), pa.field("matched", pa.bool_(), nullable=False)] if points else []
    fields += [pa.field("city", pa.string(), nullable=points), pa.field("tile_id", pa.string(), nullable=points)]
    if level == "patch":
        fields += [pa.field("patch_row", pa.int32(), nullable=False), pa.field("patch_col", pa.int32(), nullable=False)]
    return pa.schema(fields + [
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("crs", pa.string(), nullable=points),  # the tile's (the imagery's) CRS
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=points),
        pa.field("geometry", pa.binary(), nullable=False),  # WKB, EPSG:4326
    ])


# --- products (products/<run>/, files named in engine.product_layout) ------------------------------------------
# name -> (unit, definition): the per-zone columns (and the metric columns of morphology.csv), in order
MORPHOLOGY_COLUMNS: dict[str, tuple[str, str]] = {
    "n_buildings": ("count", ("buildings whose representative point (point_on_surface) lies in the zone; each "
                              "building counted in one zone only")),
    "density_per_ha": ("buildings/ha", "n_buildings / zone area in hectares"),
    "coverage_ratio": ("m2/m2", "footprint area inside the zone (footprints clipped to the zone) / zone area"),
    "footprint_mean_m2": ("m2", "mean whole-footprint area of the counted buildings; NaN without buildings"),
    "footprint_median_m2": ("m2", ("median whole-footprint area of the counted buildings (per region: from a log "
                                   "histogram, within 0.25 %); NaN without buildings")),
    "height_mean_m": ("m", "mean height of the counted buildings with a known height; NaN where none"),
    "levels_mean": ("storeys", "mean levels of the counted buildings with known levels; NaN where none"),
    "far": ("m2/m2", ("floor-area ratio: sum(clipped footprint x levels) / zone area; levels, else height / 3.0 m; "
                      "buildings with neither take the area-weighted mean of those with; NaN where none has either")),
    "nn_spacing_m": ("m", ("mean over the counted buildings of the edge-to-edge distance to the nearest other "
                           "building counted in the same zone; NaN with fewer than 2 buildings")),
}
_TYPES = {"n_buildings": pa.int32()}
MORPHOLOGY_SCHEMA = pa.schema([pa.field(name, _TYPES.get(name, pa.float64()), nullable=False)
                               for name in MORPHOLOGY_COLUMNS])

URBAN_VILLAGES_SCHEMA = pa.schema([
    pa.field("uv_id", pa.string(), nullable=False),  # <city>-<n>, n from 1 in raster-scan order of the village's first pixel
    pa.field("city", pa.string(), nullable=False),
    pa.field("region", pa.string(), nullable=False),
    pa.field("area_m2", pa.float64(), nullable=False),  # in EPSG:6933 (equal-area)
    pa.field("mean_prob", pa.float64(), nullable=False),  # mean blended p(urban_village) over the village's pixels
    pa.field("n_tiles", pa.int32(), nullable=False),  # tiles whose core's interior meets the village
    pa.field("model_version", pa.string(), nullable=False),
    *MORPHOLOGY_SCHEMA,  # building morphology of the village (engine.morphology; NaN / 0 where no buildings are known)
    pa.field("geometry", pa.binary(), nullable=False),  # WKB, EPSG:4326 (lon, lat)
])
CITY_STATS_COLUMNS = ("city", "region", "uv_area_m2", "built_up_area_m2", "uv_share", "buildings_source", "buildings", "buildings_note",
                      "polygons", "tiles_ok", "tiles_failed", "status")

# --- population products (`map --population-model`: engine.products.population) ---------------------------------
UV_POPULATION_SCHEMA = pa.schema([
    pa.field("uv_id", pa.string(), nullable=False),  # the village's id in urban_villages.parquet
    pa.field("city", pa.string(), nullable=False),
    pa.field("region", pa.string(), nullable=False),
    pa.field("area_m2", pa.float64(), nullable=False),  # as in urban_villages.parquet (EPSG:6933)
    pa.field("population", pa.float64(), nullable=False),  # residents allocated to the village's pixels
    pa.field("population_per_ha", pa.float64(), nullable=False),  # population / (area_m2 / 10 000)
    pa.field("complete", pa.bool_(), nullable=False),  # false: a tile under the village has no population prediction
    pa.field("model_version", pa.string(), nullable=False),  # the population model's version
    pa.field("geometry", pa.binary(), nullable=False),  # WKB, EPSG:4326 (lon, lat)
])
# one row per city, per region and for the nation; *_lo/*_hi: the 95 % prediction interval (docs/PRODUCTS.md)
POPULATION_COLUMNS = ("level", "name", "region", "cities", "tiles_ok", "tiles_failed", "population", "population_lo", "population_hi",
                      "uv_population", "uv_population_lo", "uv_population_hi", "uv_share", "uv_share_lo", "uv_share_hi",
                      "density_uv_per_ha", "density_built_up_per_ha", "density_other_per_ha", "calibration_factor", "held_out_cities", "interval",
                      "model_version")
