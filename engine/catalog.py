"""The catalog: one row per city (YAML, CSV or Parquet), loaded into the contract and validated row by row.

Validation reads only headers and metadata (raster profile, Parquet/GeoPackage metadata, the PBF header), so it
takes seconds for hundreds of cities, and it reports every problem at once, naming the row, city and field.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import shapely
import yaml
from pyproj import CRS

from engine import storage
from engine.atomic import atomic_path
from engine.geoparquet import read_geoparquet_crs
from engine.schema import CATALOG_REQUIRED, CATALOG_SCHEMA, SPLITS
from engine.workspace import CATALOG_NAMES, BadName, Workspace, check_name

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
VECTOR_SUFFIXES = (".parquet", ".geoparquet", ".gpkg", ".geojson", ".json", ".shp", ".fgb")
PBF_SUFFIXES = (".pbf", ".osm.pbf")
PATH_LIST_SEP = ";"  # a cell naming several files (a city's OSM as point/line/polygon GeoJSONs): "a.geojson;b.geojson"


class CatalogError(ValueError):
    """The catalog file itself cannot be used (missing, wrong format, required column absent)."""


@dataclass(frozen=True)
class CatalogProblem:
    """One problem of one catalog row; ``row`` counts data rows from 1 (the header is not a row)."""

    row: int
    city: str
    field: str
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        return f"row {self.row} ({self.city or '?'}) {self.field}: {self.message}"


def find_catalog(workspace: str | os.PathLike[str]) -> Path:
    """The workspace's catalog file (``catalog.yaml``/``.yml``/``.csv``/``.parquet``); error says how to make one."""
    ws = Workspace.at(workspace)
    for path in ws.catalog_candidates():
        if ws.fetch(path).is_file():  # fetched from the object store for a remote workspace
            return path
    raise CatalogError(
        f"no catalog in workspace {ws.root} (looked for {', '.join(CATALOG_NAMES)}): run "
        f"`geolink-engine --workspace {ws.location} demo-data` or pass --catalog PATH"
    )


def load_catalog(path: str | os.PathLike[str]) -> pa.Table:
    """Read a catalog file into :data:`engine.schema.CATALOG_SCHEMA`, resolving relative paths against its folder.

    Cells are not checked here beyond the required columns; :func:`validate_catalog` checks every row.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "catalog.csv"
        >>> _ = p.write_text("city,region,imagery,osm\\nwuhan,central,wuhan.tif,wuhan.parquet\\n")
        >>> load_catalog(p).column("imagery")[0].as_py() == str(p.parent / "wuhan.tif")
        True
    """
    path = storage.local_path(path) if storage.is_remote(str(path)) else Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            rows = _yaml_rows(path)
        elif suffix == ".csv":
            rows = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                                             column_types={n: pa.string() for n in CATALOG_SCHEMA.names})).to_pylist()
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        else:
            raise CatalogError(f"catalog {path}: unknown format {suffix!r}; use .yaml, .csv or .parquet")
    except (OSError, yaml.YAMLError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"catalog {path} cannot be read: {exc}") from None
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = [c for c in CATALOG_REQUIRED if c not in columns]
    if rows and missing:
        raise CatalogError(f"catalog {path}: missing required column(s) {', '.join(missing)}; required: {', '.join(CATALOG_REQUIRED)}")
    if not rows:
        raise CatalogError(f"catalog {path} has no rows")
    base = path.parent.absolute()  # absolute: workers (and a cluster's nodes) do not share the driver's cwd
    out = {name: [] for name in CATALOG_SCHEMA.names}
    for r in rows:
        for name in CATALOG_SCHEMA.names:
            value = r.get(name)
            if isinstance(value, list | tuple):  # a YAML list (several OSM files for one city): one ';'-joined cell
                value = PATH_LIST_SEP.join(str(v).strip() for v in value if v is not None and str(v).strip())
            value = None if value is None or (isinstance(value, str) and not value.strip()) else str(value).strip()
            is_path = name in ("imagery", "osm", "reference", "buildings", "population", "co2") or (name == "aoi" and value is not None and not _looks_like_wkt(value))
            if value is not None and is_path:
                value = PATH_LIST_SEP.join(resolve_path(v.strip(), base) for v in value.split(PATH_LIST_SEP) if v.strip())
            out[name].append(value)
    return pa.table({n: pa.array(v, pa.string()) for n, v in out.items()})


def resolve_path(value: str, base: Path) -> str:
    """Resolve a catalog path against the catalog's folder; URIs (``s3://``, ``/vsis3/``, ...) pass through.

    A catalog fetched from an object store resolves its relative paths to URIs in that store (rasters are then
    read in place, by range requests).
    """
    if "://" in value or value.startswith("/vsi"):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    remote = storage.uri_of(base)
    return f"{remote}/{p.as_posix()}" if remote else str(base / p)


def write_catalog(rows: Iterable[dict], path: str | os.PathLike[str]) -> Path:
    """Write catalog rows as YAML (``cities:`` list), atomically; paths are written as given (keep them relative)."""
    path = Path(path)
    rows = [{k: r.get(k) for k in CATALOG_SCHEMA.names if r.get(k) is not None} for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({"cities": rows}, sort_keys=False, allow_unicode=True, width=10_000))
    return path


def city_path(root: str | os.PathLike[str], city: str) -> Path:
    """``root/city`` after checking the slug, so that no catalog value can point a write outside ``root``."""
    return Path(root) / check_name("city", city)


def select_cities(catalog: pa.Table, cities: str) -> pa.Table:
    """Rows for ``cities`` = ``all`` or a comma list of slugs; unknown names are an error listing the known ones."""
    if cities.strip() == "all":
        return catalog
    wanted = [c.strip() for c in cities.split(",") if c.strip()]
    known = catalog.column("city").to_pylist()
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise CatalogError(f"unknown cities {', '.join(unknown)}; the catalog has {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    return catalog.filter(pc.is_in(catalog.column("city"), pa.array(wanted)))


# --- validation ------------------------------------------------------------------------------------------------
def city_problems(catalog: pa.Table) -> list[CatalogProblem]:
    """The ``city`` and ``vintage`` columns' problems (empty, not a slug, duplicate city + vintage), one per row at
    most, reading no file: what must hold before a city name (and a vintage) becomes a folder (the `prepare` and
    `map` pre-check; :func:`validate_catalog` too)."""
    problems: list[CatalogProblem] = []
    seen: dict[tuple[str, str | None], int] = {}
    vintages = catalog.column("vintage").to_pylist() if "vintage" in catalog.column_names else [None] * catalog.num_rows
    for i, (city, vintage) in enumerate(zip(catalog.column("city").to_pylist(), vintages), start=1):
        city = city or ""
        key = (city, vintage)
        if not city:
            problems.append(CatalogProblem(i, city, "city", "empty; every row needs a city slug"))
        elif (bad := _name_problem(city)):
            problems.append(CatalogProblem(i, city, "city", bad))
        elif vintage is not None and (bad := _name_problem(vintage, "vintage")):
            problems.append(CatalogProblem(i, city, "vintage", bad))
        elif key in seen:
            what = f"city {city} at vintage {vintage}" if vintage is not None else "city slugs"
            problems.append(CatalogProblem(i, city, "city", f"duplicate of row {seen[key]}; {what} must be unique"
                                           + ("" if vintage is not None else " (or give each row its `vintage`)")))
        else:
            seen[key] = i
    return problems


def catalog_vintages(catalog: pa.Table) -> list[str]:
    """The vintages a catalog holds, sorted (empty when it has no ``vintage`` column or it is empty)."""
    if "vintage" not in catalog.column_names:
        return []
    return sorted({v for v in catalog.column("vintage").to_pylist() if v is not None})


def select_vintage(catalog: pa.Table, vintage: str | None) -> pa.Table:
    """The rows of one vintage: ``vintage`` given, the rows with it (an unknown one is an error listing those
    present); none given, the whole catalog when it holds at most one vintage, else an error asking for one.

    Rows without a vintage belong to every vintage (a city whose imagery has one date only)."""
    present = catalog_vintages(catalog)
    if vintage is None:
        if len(present) > 1:
            raise CatalogError(f"the catalog holds vintages {', '.join(present)}: choose one with --vintage")
        return catalog
    check_name("vintage", vintage)
    if vintage not in present:
        raise CatalogError(f"vintage {vintage} is not in the catalog" + (f"; it holds {', '.join(present)}" if present
                                                                        else " (it has no `vintage` column)"))
    column = catalog.column("vintage")
    return catalog.filter(pc.or_kleene(pc.equal(column, vintage), pc.is_null(column)))  # Kleene: null or true is true


def check_city_names(catalog: pa.Table, source: str | os.PathLike[str] | None = None) -> pa.Table:
    """``catalog`` when every city name is a valid slug and appears once (:func:`city_problems`); else one
    :class:`CatalogError` listing the rows. Every stage that turns names into folders calls it before any work.

    A stage works on one date, so a city listed at two vintages is refused here too (a multi-date catalog is fine for
    `catalog validate`; `--vintage` picks a date first): its two dates would land in one folder."""
    problems = city_problems(catalog)
    if problems:
        where = f" on {source}" if source else ""
        raise CatalogError("; ".join(str(p) for p in problems) + f" (run `geolink-engine catalog validate`{where})")
    counts = Counter(catalog.column("city").to_pylist())
    twice = sorted(c for c, n in counts.items() if n > 1)
    if twice:
        raise CatalogError(f"city {twice[0]} is listed at vintages {', '.join(map(str, catalog_vintages(catalog.filter(pc.equal(catalog.column('city'), twice[0])))))}"
                           f"{f' (and {len(twice) - 1} more cities)' if len(twice) > 1 else ''}: a stage works on one date; "
                           f"choose one with --vintage")
    return catalog


def _name_problem(city: str, kind: str = "city") -> str:
    try:
        check_name(kind, city)
    except BadName as exc:
        return str(exc)
    return ""


def validate_catalog(catalog: pa.Table, facts: dict | None = None) -> list[CatalogProblem]:
    """Check every row of a loaded catalog; return all problems (errors and warnings), in row order.

    Checks: slug and uniqueness, region, split; imagery readable with a CRS, 3+ bands, north-up, its first and last
    blocks and smallest overview readable (a truncated file), 8-bit (a warning: prepare and map refuse other pixel
    types); OSM readable, non-empty, with a CRS; imagery and OSM overlap; optional AOI (WKT or file), reference
    (with ``class``) and buildings (readable, polygons, a CRS (any), overlapping the imagery). ``facts``: when given, filled with each readable raster's
    :class:`engine.imagery.ImageryFacts` by city (CRS, size, bands, pixel type, ground GSD in metres).
    """
    problems: list[CatalogProblem] = []
    facts = {} if facts is None else facts
    slugs = {p.row: p for p in city_problems(catalog)}
    for i, row in enumerate(catalog.to_pylist(), start=1):
        city = row.get("city") or ""

        def report(field: str, message: str, severity: str = "error") -> None:
            problems.append(CatalogProblem(i, city, field, message, severity))

        if i in slugs:
            problems.append(slugs[i])
        if not row.get("region"):
            report("region", "empty; every city needs a region stratum")
        split = row.get("split")
        if split is not None and split not in SPLITS:
            report("split", f"{split!r} is not one of {', '.join(SPLITS)}")

        image_bounds = _check_imagery(row.get("imagery"), report, facts, city, zoom=row.get("zoom"), asset=row.get("asset"))
        for field, message, severity in _input_problems(row, facts.get(city)):
            report(field, message, severity)
        osm_bounds = _check_vector(row.get("osm"), "osm", report, need_rows=True)
        if image_bounds is not None and osm_bounds is not None and not shapely.box(*image_bounds).intersects(shapely.box(*osm_bounds)):
            report("osm", f"does not overlap the imagery (imagery {_fmt(image_bounds)}, OSM {_fmt(osm_bounds)} in EPSG:4326)")
        aoi = row.get("aoi")
        if aoi:
            aoi_bounds = _check_aoi(aoi, report)
            if aoi_bounds is not None and image_bounds is not None and not shapely.box(*image_bounds).intersects(shapely.box(*aoi_bounds)):
                report("aoi", "does not overlap the imagery")
        if row.get("reference"):
            _check_vector(row["reference"], "reference", report, need_rows=True, need_column="class")
        if row.get("buildings"):
            buildings_bounds = _check_buildings(row["buildings"], report)
            if image_bounds is not None and buildings_bounds is not None \
                    and not shapely.box(*image_bounds).intersects(shapely.box(*buildings_bounds)):
                report("buildings", f"{row['buildings']} does not overlap the imagery (imagery {_fmt(image_bounds)}, "
                                    f"buildings {_fmt(buildings_bounds)} in EPSG:4326)")
    return problems


def _check_imagery(path: str | None, report, facts: dict | None = None, city: str = "", zoom: str | None = None,
                   asset: str | None = None) -> tuple[float, float, float, float] | None:
    """Resolve the imagery's form (a tile folder or glob, MBTiles, XYZ folder or STAC item becomes one VRT in a
    temporary folder: :func:`engine.imagery_sources.resolve_imagery`, headers only), then check the raster."""
    import tempfile

    from engine.imagery_sources import (
        ImagerySourceError,
        imagery_form,
        parse_zoom,
        resolve_imagery,
    )

    if not path:
        report("imagery", "empty; every city needs imagery (a GeoTIFF, COG, VRT, tile folder, MBTiles, XYZ folder or STAC item)")
        return None
    form = imagery_form(path)
    try:
        if parse_zoom(zoom, path) is not None and form not in ("mbtiles", "xyz", "stac"):
            report("zoom", f"ignored: {path} is a {form}, not a tile cache (MBTiles or XYZ folder)", severity="warning")
    except ImagerySourceError as exc:
        report("zoom", str(exc))
        return None
    if asset and form != "stac":
        report("asset", f"ignored: {path} is a {form}, not a STAC item", severity="warning")
    with tempfile.TemporaryDirectory(prefix="geolink-imagery-") as tmp:
        try:
            source = resolve_imagery(path, zoom=zoom, asset=asset if form == "stac" else None, out_dir=Path(tmp))
        except ImagerySourceError as exc:
            report("imagery", str(exc))
            return None
        return _check_raster(source, path, report, facts, city)


def _input_problems(row: dict, found) -> list[tuple[str, str, str]]:
    """The row's ``bands`` and ``radiometry`` against its imagery's facts (``found``; None: unreadable, only the
    texts are checked), from metadata only: what `prepare` and `map` will read, as ``(field, message, severity)``."""
    from engine.model_input import MODEL_BANDS, Radiometry, parse_bands

    out = []
    try:
        bands = parse_bands(row.get("bands"))
    except ValueError as exc:
        out.append(("bands", str(exc), "error"))
        bands = None
    try:
        radiometry = Radiometry.parse(row.get("radiometry"))
    except ValueError as exc:
        out.append(("radiometry", str(exc), "error"))
        radiometry = None
    if found is None:
        return out
    if bands and max(bands) > found.bands:
        out.append(("bands", f"{row['bands']} asks for band {max(bands)}; {found.path} has {found.bands}", "error"))
    if radiometry is not None and radiometry.method == "uint8" and found.dtype != "uint8":
        out.append(("radiometry", f"declared uint8, but {found.path} is {found.dtype}: use auto, percentile:LO,HI or range:MIN,MAX", "error"))
    elif radiometry is not None and radiometry.method == "auto" and found.dtype != "uint8":
        out.append(("imagery", f"{found.path} is {found.dtype}: read as 8-bit by a per-band percentile:2,98 stretch computed for "
                               f"the city (radiometry auto); give radiometry range:MIN,MAX for a sensor's fixed scale", "warning"))
    if found.bands > MODEL_BANDS and not bands:
        out.append(("bands", f"{found.path} has {found.bands} bands; bands 1,2,3 are read as R,G,B (give bands, e.g. 3,2,1, "
                             f"for another order)", "warning"))
    return out


def _check_raster(source: str, path: str, report, facts: dict | None, city: str) -> tuple[float, float, float, float] | None:
    """Header checks of the raster ``source`` (the catalog's ``path``, or what it resolved to; messages name ``path``)
    plus a cheap read (the smallest overview, the first and last block of each band) that catches a truncated file;
    records the raster's :class:`engine.imagery.ImageryFacts` in ``facts[city]``."""
    import rasterio
    from rasterio.warp import transform_bounds

    from engine.errors import describe_error
    from engine.imagery import inspect_imagery

    try:
        with warnings.catch_warnings(), storage.raster_env(), rasterio.open(source) as src:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            if src.crs is None:
                report("imagery", f"{path} has no CRS; write one (e.g. gdal_edit.py -a_srs EPSG:32650 {Path(path).name})")
                return None
            if src.count < 3:
                report("imagery", f"{path} has {src.count} band(s); RGB imagery needs at least 3")
            if src.transform.b != 0 or src.transform.d != 0:
                report("imagery", f"{path} has a rotated geotransform; warp it north-up first (gdalwarp)")
            if src.width == 0 or src.height == 0:
                report("imagery", f"{path} is empty ({src.width}x{src.height} px)")
                return None
            found, _, damage = inspect_imagery(src, path)  # bands and pixel type: _input_problems
            if facts is not None:
                facts[city] = found
            if damage:
                report("imagery", damage)
            return tuple(transform_bounds(src.crs, CRS.from_epsg(4326), *src.bounds))
    except rasterio.errors.RasterioError as exc:
        report("imagery", f"{path} cannot be read as a raster: {describe_error(exc)}")
    return None


def _check_vector(path: str | None, field: str, report, need_rows: bool, need_column: str | None = None) -> tuple[float, float, float, float] | None:
    """Metadata-only check of an OSM or reference file; returns its bounds in EPSG:4326 when known."""
    if not path:
        report(field, "empty")
        return None
    if PATH_LIST_SEP in path or ("://" not in path and Path(path).is_dir()):
        return _check_vector_set(path, field, report, need_rows, need_column)
    p = Path(path)
    if "://" not in path and not p.is_file():
        report(field, f"file not found: {path}")
        return None
    name = p.name.lower()
    try:
        if storage.is_remote(path):  # vector files are read whole anyway: fetch once into the node's cache
            path = str(storage.local_path(path))
        if name.endswith(PBF_SUFFIXES):
            return _check_pbf(path, field, report)
        if name.endswith((".parquet", ".geoparquet")):
            meta = pq.read_metadata(path)
            schema = pq.read_schema(path)
            if b"geo" not in (schema.metadata or {}):
                report(field, f"{path} is Parquet without GeoParquet 'geo' metadata; write it with geopandas.to_parquet")
                return None
            geo = json.loads(schema.metadata[b"geo"])
            column = geo["columns"][geo["primary_column"]]
            crs = read_geoparquet_crs(path)
            bounds = column.get("bbox")
            names = schema.names
            rows = meta.num_rows
        elif name.endswith(VECTOR_SUFFIXES):
            import pyogrio

            info = pyogrio.read_info(path, force_total_bounds=True)
            crs = CRS.from_user_input(info["crs"]) if info.get("crs") else None
            bounds = [float(b) for b in info["total_bounds"]] if info.get("total_bounds") is not None else None
            names = list(info["fields"])
            rows = int(info["features"])
        else:
            report(field, f"{path}: unknown format; use GeoParquet, GeoPackage, GeoJSON or .osm.pbf")
            return None
    except Exception as exc:  # any reader failure is a problem of this row, never a crash of the whole check
        report(field, f"{path} cannot be read: {type(exc).__name__}: {exc}")
        return None
    if need_rows and rows == 0:
        report(field, f"{path} has no features")
        return None
    if need_column and need_column not in names:
        report(field, f"{path} has no '{need_column}' column (columns: {', '.join(n for n in names if n != 'geometry')})")
    if crs is None:
        report(field, f"{path} has no CRS; OSM and reference data must say their CRS (EPSG:4326 expected)")
        return None
    if not crs.equals(CRS.from_epsg(4326)) and not crs.equals(CRS.from_user_input("OGC:CRS84")):
        report(field, f"{path} is in {crs.to_string()}, not EPSG:4326; it is reprojected on ingest", severity="warning")
        if bounds:
            from pyproj import Transformer

            bounds = Transformer.from_crs(crs, CRS.from_epsg(4326), always_xy=True).transform_bounds(*bounds)
    return tuple(bounds) if bounds else None


def _check_vector_set(spec: str, field: str, report, need_rows: bool, need_column: str | None) -> tuple[float, float, float, float] | None:
    """A ``;`` list, a folder of OSM/vector files or a partitioned OSM dataset (``engine.osm.dataset``): each file
    checked as one (a dataset by its manifest alone); bounds = the union of those known. Each problem names its file."""
    from engine.osm import OsmIngestError, is_osm_dataset, read_manifest
    from engine.osm.sources import folder_files

    boxes = []
    files: list[str] = []
    for item in (s.strip() for s in spec.split(PATH_LIST_SEP) if s.strip()):
        if "://" in item or not Path(item).is_dir():
            files.append(item)
            continue
        try:
            if not is_osm_dataset(item):
                files.extend(str(f) for f in folder_files(item))
                continue
            manifest = read_manifest(item)
        except OsmIngestError as exc:  # a broken manifest, a folder without OSM files: one line naming it
            report(field, str(exc))
            continue
        if need_rows and manifest["features"] == 0:
            report(field, f"{item} (OSM dataset) has no features")
        elif need_column and need_column not in ("osm_id", "kind", "tags"):
            report(field, f"{item} (OSM dataset) has no '{need_column}' column (columns: osm_id, kind, tags)")
        elif manifest.get("bbox"):
            boxes.append(manifest["bbox"])
    for file in files:
        bounds = _check_vector(file, field, report, need_rows, need_column)
        if bounds is not None:
            boxes.append(bounds)
    if not boxes:
        return None
    b = np.asarray(boxes, dtype=float)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def _check_buildings(path: str, report) -> tuple[float, float, float, float] | None:
    """Metadata-only check of a buildings file (engine.buildings reads it): readable, features, polygons, a CRS
    (any: it is reprojected), numeric height/levels columns; returns its bounds in EPSG:4326 when known."""
    from engine.buildings import (
        HEIGHT_COLUMNS,
        LEVELS_COLUMNS,
        OGR_SUFFIXES,
        PARQUET_SUFFIXES,
    )

    p = Path(path)
    if "://" not in path and not p.is_file():
        report("buildings", f"file not found: {path}")
        return None
    name = p.name.lower()
    try:
        if storage.is_remote(path):
            path = str(storage.local_path(path))
        if name.endswith(PARQUET_SUFFIXES):
            schema = pq.read_schema(path)
            if b"geo" not in (schema.metadata or {}):
                report("buildings", f"{path} is Parquet without GeoParquet 'geo' metadata (so no CRS); write it with geopandas.to_parquet")
                return None
            geo = json.loads(schema.metadata[b"geo"])
            column = geo["columns"][geo["primary_column"]]
            crs = read_geoparquet_crs(path)
            bounds = column.get("bbox")
            types = [str(t) for t in column.get("geometry_types") or []]
            rows = pq.read_metadata(path).num_rows
            kinds = {n: ("numeric" if pa.types.is_integer(schema.field(n).type) or pa.types.is_floating(schema.field(n).type) else str(schema.field(n).type))
                     for n in schema.names}
        elif name.endswith(OGR_SUFFIXES):
            import pyogrio

            info = pyogrio.read_info(path, force_total_bounds=True)
            crs = CRS.from_user_input(info["crs"]) if info.get("crs") else (CRS.from_epsg(4326) if name.endswith((".geojson", ".json")) else None)
            bounds = [float(b) for b in info["total_bounds"]] if info.get("total_bounds") is not None else None
            types = [str(info.get("geometry_type") or "")]
            rows = int(info["features"])
            kinds = {n: ("numeric" if str(t).startswith(("int", "float")) else str(t)) for n, t in zip(info["fields"], info["dtypes"])}
        else:
            report("buildings", f"{path}: unknown format; use GeoParquet, GeoPackage or GeoJSON")
            return None
    except Exception as exc:  # any reader failure is a problem of this row, never a crash of the whole check
        report("buildings", f"{path} cannot be read: {type(exc).__name__}: {exc}")
        return None
    if rows == 0:
        report("buildings", f"{path} has no features: the city has no buildings", severity="warning")
        return None
    if types and not any("polygon" in t.lower() or t.lower() in ("unknown", "geometry", "") for t in types):
        report("buildings", f"{path} holds {', '.join(types)} geometries; buildings must be footprint polygons")
        return None
    for col in (next((c for c in names if c in kinds), None) for names in (HEIGHT_COLUMNS, LEVELS_COLUMNS)):
        if col is not None and kinds[col] != "numeric":
            report("buildings", f"{path}: column '{col}' is {kinds[col]}, not numbers; values that are not numbers are refused when read",
                   severity="warning")
    if crs is None:
        report("buildings", f"{path} has no CRS; write it with its CRS (any CRS is fine: buildings are reprojected)")
        return None
    if bounds and not np.all(np.isfinite(bounds)):
        bounds = None
    if bounds and not crs.equals(CRS.from_epsg(4326), ignore_axis_order=True):
        from pyproj import Transformer

        bounds = Transformer.from_crs(crs, CRS.from_epsg(4326), always_xy=True).transform_bounds(*bounds, densify_pts=21)
    return tuple(bounds) if bounds else None


def _check_pbf(path: str, field: str, report) -> tuple[float, float, float, float] | None:
    import osmium

    reader = osmium.io.Reader(path, osmium.osm.osm_entity_bits.NOTHING)
    try:
        box = reader.header().box()
    finally:
        reader.close()
    has_node = next(iter(osmium.FileProcessor(path, osmium.osm.NODE)), None) is not None
    if not has_node:
        report(field, f"{path} has no OSM nodes")
        return None
    if box.valid():
        return (box.bottom_left.lon, box.bottom_left.lat, box.top_right.lon, box.top_right.lat)
    return None


def _check_aoi(aoi: str, report) -> tuple[float, float, float, float] | None:
    if _looks_like_wkt(aoi):
        try:
            geom = shapely.from_wkt(aoi)
        except shapely.errors.GEOSException as exc:
            report("aoi", f"not valid WKT: {exc}")
            return None
        if geom.geom_type not in ("Polygon", "MultiPolygon") or geom.is_empty:
            report("aoi", f"must be a (multi)polygon in EPSG:4326, got {geom.geom_type}")
            return None
        if not geom.is_valid:
            report("aoi", f"invalid polygon ({shapely.is_valid_reason(geom)})")
        return tuple(geom.bounds)
    return _check_vector(aoi, "aoi", report, need_rows=True)


def _looks_like_wkt(value: str) -> bool:
    return value.lstrip().upper().startswith(("POLYGON", "MULTIPOLYGON", "GEOMETRYCOLLECTION", "POINT", "LINESTRING"))


def _yaml_rows(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "cities" in data:
        data = data["cities"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise CatalogError(f"catalog {path}: expected a list of city mappings (or a 'cities:' key holding one)")
    return data


def _fmt(bounds: Iterable[float]) -> str:
    return "[" + ", ".join(f"{b:.4f}" for b in bounds) + "]"
