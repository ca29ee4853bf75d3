"""A run's products as a static STAC 1.1 Collection, and its validation against schemas bundled on disk.

Why static and self-contained: the products folder is copied around (object store, a USB disk, a web server),
so every link and asset href is relative and the catalog holds nothing that depends on where or when it was
written (no wall-clock timestamp: a rerun over the same products is byte-identical).

Why offline validation: the machines that publish are often cut off from the internet, and a validator that
fetches schemas either hangs there or, worse, skips. Core schemas come from pystac's bundled copies; the
projection extension's schema is bundled in ``engine/data``; any other ``$ref`` is an error, never a download.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pystac
import rasterio
import shapely
from pystac.errors import STACValidationError
from pystac.extensions.projection import ProjectionExtension
from pystac.validation import validate_dict
from pystac.validation.local_validator import get_local_schema_cache
from pystac.validation.schema_uri_map import DefaultSchemaUriMap
from pystac.validation.stac_validator import STACValidator
from rasterio.warp import transform_geom
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT7

from engine.atomic import atomic_path
from engine.product_layout import (
    ACCURACY_DIR,
    CITY_STATS,
    CHANGE_POLYGONS_GPKG,
    CHANGE_POLYGONS_PARQUET,
    CHANGE_STATS_CSV,
    INDEX_HTML,
    MAP_HTML,
    MORPHOLOGY_CSV,
    MORPHOLOGY_PNG,
    OVERVIEW_PNG,
    POPULATION_CSV,
    POPULATION_PNG,
    PREVIEW_PNG,
    PROB_SCALE,
    REGIONS_CSV,
    REGIONS_PNG,
    STAC_DIR,
    UV_GPKG,
    UV_PARQUET,
    UV_POPULATION_PARQUET,
    city_cogs,
    city_folder,
    embeddings_files,
    product_cities,
    read_change_cities,
    read_city_stats,
    read_run,
)

STAC_VERSION = "1.1.0"
COLLECTION_JSON = "collection.json"
# Used when run.json says nothing about time: STAC needs a datetime, and a constant keeps reruns identical.
PLACEHOLDER_DATETIME = datetime(1970, 1, 1, tzinfo=UTC)
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EXTENSION_SCHEMAS = {ProjectionExtension.get_schema_uri(): DATA_DIR / "stac-projection-v2.0.0.json"}
COORD_DECIMALS = 7  # ~1 cm in EPSG:4326
MEDIA_TYPES = {
    ".parquet": "application/vnd.apache.parquet",
    ".gpkg": "application/geopackage+sqlite3",
    ".csv": "text/csv",
    ".json": "application/json",
    ".html": "text/html",
    ".png": "image/png",
    ".tif": pystac.MediaType.COG,
}


class STACProductsError(ValueError):
    """The STAC of a products folder is invalid; the message lists every problem, one per line, by file."""


# --- writing -----------------------------------------------------------------------------------------------------
def write_stac(products_dir: str | os.PathLike[str], run_title: str | None = None, *,
               datetime_range: tuple[datetime, datetime] | None = None) -> Path:
    """Write ``stac/collection.json`` + one Item per city with COGs (``stac/<city>/<city>.json``), atomically.

    Items carry the city's footprint and bbox in EPSG:4326 (from the COG bounds), ``proj:code/shape/transform/bbox``,
    the city's ``city_stats.csv`` row as ``geolink:*`` properties, and the COGs (plus ``preview.png`` when the page
    was written) as assets. The Collection's assets are the national files (GeoParquet, GeoPackage, stats CSV, and
    ``index.html``/``overview.png``/``accuracy/*``/``embeddings/*`` when present: call
    :func:`engine.products.page.write_page` first to list them). Failed cities without COGs get no Item; their row stays in ``city_stats.csv``.

    Args:
        products_dir: the run's products folder (``products/<run>``).
        run_title: the Collection title; default names the run and model version.
        datetime_range: the imagery's time span; default ``start_datetime``/``end_datetime`` (or ``datetime``) from
            ``run.json``, else a fixed placeholder (1970-01-01), never the wall clock.

    Returns:
        The path of ``collection.json``.

    Example (on a stitched run's products; ``tests/test_products.py`` runs it on real ones)::

        write_stac(Path("geolink-data/products/default"))
        PosixPath('products/demo/stac/collection.json')
    """
    products_dir = Path(products_dir).resolve()
    run = read_run(products_dir)
    stats = {row["city"]: row for row in (read_change_cities(products_dir) if run.get("kind") == "change" else read_city_stats(products_dir))}
    start, end = _time_range(run, datetime_range)
    stac_dir = products_dir / STAC_DIR

    items = []
    for city in product_cities(products_dir, list(stats.values())):
        item = _city_item(products_dir, city, stats.get(city), run, start, end)
        if item is not None:
            items.append(item)
    if not items:
        raise FileNotFoundError(f"products {products_dir}: no city has COGs under cities/<city>/; nothing to catalog "
                                "(did every city fail? see city_stats.csv)")
    west, south, east, north = zip(*(item.bbox for item in items))
    collection = pystac.Collection(
        id=run["run"],
        title=run_title or (f"Urban villages, run {run['run']} (model {run['model_version']})" if run.get("kind") != "change"
                            else f"Urban-village change {' to '.join(run.get('vintages') or [])}, run {run['run']}"),
        description=(f"Urban-village map of run `{run['run']}` by model `{run['model_version']}`: per-city UV probability "
                     f"(uint8 = round(p*{PROB_SCALE}), nodata 255) and class COGs, national UV polygons and city statistics."
                     if run.get("kind") != "change" else
                     f"Urban-village change from run `{run.get('before')}` ({(run.get('vintages') or ['?'])[0]}) to run "
                     f"`{run.get('after')}` ({(run.get('vintages') or ['?', '?'])[-1]}), model `{run['model_version']}`: per-city "
                     f"change COGs, the fate of every UV polygon, change statistics and their accuracy."),
        extent=pystac.Extent(pystac.SpatialExtent([[min(west), min(south), max(east), max(north)]]),
                             pystac.TemporalExtent([[start, end]])),
        license="other",
        extra_fields={f"geolink:{k}": run[k] for k in ("run", "model_version", "mode", "classes", "tile_size_px", "overlap_px",
                                                      "built_up") if k in run},
    )
    for key, name, roles, title in (
        ("urban_villages_parquet", UV_PARQUET, ["data"], "UV polygons (GeoParquet 1.1, EPSG:4326)"),
        ("urban_villages_gpkg", UV_GPKG, ["data"], "UV polygons (GeoPackage, layer urban_villages)"),
        ("city_stats", CITY_STATS, ["metadata"], "Per-city UV area, share, polygons and tile counts"),
        ("index", INDEX_HTML, ["overview"], "Offline preview page"),
        ("map", MAP_HTML, ["overview"], "Interactive web map (MapLibre GL; its files under web/; `geolink-engine serve`)"),
        ("overview", OVERVIEW_PNG, ["overview"], "National overview: cities coloured by UV share"),
        ("regions", REGIONS_CSV, ["metadata"], "UV area and share of built-up land per region and nationally, map and estimates"),
        ("regions_chart", REGIONS_PNG, ["overview"], "UV share of built-up land by region with 95% confidence intervals"),
        ("morphology", MORPHOLOGY_CSV, ["metadata"], "Building morphology per city, region and nation (UV, formal residential, built-up)"),
        ("morphology_chart", MORPHOLOGY_PNG, ["overview"], "Building morphology by region: UV against formal residential"),
        ("population", POPULATION_CSV, ["metadata"], "Residents, UV residents and UV share per city, region and nation, 95% intervals"),
        ("uv_population", UV_POPULATION_PARQUET, ["data"], "Residents per UV polygon (GeoParquet 1.1, EPSG:4326)"),
        ("population_chart", POPULATION_PNG, ["overview"], "Residents and their share in urban villages by region, 95% intervals"),
        ("change_stats", CHANGE_STATS_CSV, ["metadata"], "UV change (persistent, demolished, new) per city, region and nation"),
        ("change_polygons_parquet", CHANGE_POLYGONS_PARQUET, ["data"], "UV polygons of both dates with their fate (GeoParquet 1.1, EPSG:4326)"),
        ("change_polygons_gpkg", CHANGE_POLYGONS_GPKG, ["data"], "UV polygons of both dates with their fate (GeoPackage)"),
    ):
        if (products_dir / name).is_file():
            collection.add_asset(key, _asset(products_dir / name, stac_dir, roles, title))
    accuracy = products_dir / ACCURACY_DIR
    if accuracy.is_dir():
        for path in sorted(p for p in accuracy.glob("*") if p.is_file() and not p.name.startswith(".")):
            key = "accuracy_" + "_".join(path.relative_to(accuracy).with_suffix("").parts)
            collection.add_asset(key, _asset(path, stac_dir, ["metadata"], f"Accuracy assessment: {path.name}"))
    for path in embeddings_files(products_dir):  # `geolink-engine embed`: <mode>_<level>.parquet
        mode, _, level = path.stem.partition("_")
        collection.add_asset(f"embeddings_{path.stem}", _asset(path, stac_dir, ["data"],
                                                               f"Encodings (GeoParquet, EPSG:4326): mode {mode}, level {level}"))

    collection.add_items(items)
    collection.normalize_hrefs(str(stac_dir))
    with atomic_path(stac_dir) as tmp:
        collection.save(pystac.CatalogType.SELF_CONTAINED, dest_href=str(tmp))
    return stac_dir / COLLECTION_JSON


def _city_item(products_dir: Path, city: str, stats: dict | None, run: dict, start: datetime, end: datetime) -> pystac.Item | None:
    """One city's Item from its COGs' headers, or ``None`` when the city has no COG (a failed city)."""
    cogs = city_cogs(products_dir, city)
    if not cogs:
        return None
    grids = {}
    for key, path in cogs.items():
        with rasterio.open(path) as src:
            if src.crs is None:
                raise ValueError(f"city {city}: {path} has no CRS; rerun `geolink-engine stitch` for this city")
            grids[key] = (src.crs, src.bounds, src.transform, (src.height, src.width))
    crs, bounds, transform, shape = grids.get("uv_prob") or next(iter(grids.values()))
    geometry, bbox = _footprint_4326(crs, bounds)

    properties: dict[str, Any] = {"title": city, "geolink:model_version": run["model_version"]}
    for key, value in (stats or {}).items():
        if key != "city" and value is not None:
            properties[f"geolink:{key}"] = value
    item = pystac.Item(id=city, geometry=geometry, bbox=bbox, datetime=None if start != end else start, properties=properties,
                       start_datetime=start if start != end else None, end_datetime=end if start != end else None)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = crs.to_epsg()
    proj.code = f"EPSG:{epsg}" if epsg else None
    if not epsg:
        proj.wkt2 = crs.to_wkt()
    proj.shape = list(shape)
    proj.transform = [float(v) for v in list(transform)[:6]]
    proj.bbox = [float(v) for v in bounds]

    json_dir = products_dir / STAC_DIR / city
    titles = {"uv_prob": f"UV probability (uint8 = round(p*{PROB_SCALE}), nodata 255)",
              "class": f"Class index (uint8, nodata 255; classes: {', '.join(run.get('classes', []))})",
              "population": "Residents per 100 m cell (float32, nodata -1; `map --population-model`)",
              "change": "UV change between two dates (uint8: 0 other, 1 persistent UV, 2 demolished UV, 3 new UV; nodata 255)"}
    for key, path in cogs.items():
        item.add_asset(key, _asset(path, json_dir, ["data"], titles[key]))
        other_crs, other_bounds, other_transform, other_shape = grids[key]
        if (other_crs, other_transform, other_shape) != (crs, transform, shape):  # a grid of its own: say so on the asset
            asset_proj = ProjectionExtension.ext(item.assets[key])
            asset_proj.code = f"EPSG:{other_crs.to_epsg()}" if other_crs.to_epsg() else None
            asset_proj.shape = list(other_shape)
            asset_proj.transform = [float(v) for v in list(other_transform)[:6]]
            asset_proj.bbox = [float(v) for v in other_bounds]
    preview = city_folder(products_dir, city) / PREVIEW_PNG
    if preview.is_file():
        item.add_asset("preview", _asset(preview, json_dir, ["overview"], f"{city}: imagery, UV probability and polygons"))
    return item


def _asset(path: Path, json_dir: Path, roles: list[str], title: str) -> pystac.Asset:
    """An asset whose href is relative to the JSON file that will hold it (self-contained catalog)."""
    href = Path(os.path.relpath(path, json_dir)).as_posix()
    return pystac.Asset(href=href, media_type=MEDIA_TYPES.get(path.suffix.lower()), roles=roles, title=title)


def _footprint_4326(crs, bounds) -> tuple[dict, list[float]]:
    """The raster's outline in EPSG:4326 and its bbox.

    The outline is densified (20 segments a side) before reprojection so that curved edges keep their extent in
    the bbox, then simplified to the coordinate precision so that straight edges do not carry 80 vertices.
    """
    step = max(bounds.right - bounds.left, bounds.top - bounds.bottom) / 20
    dense = shapely.segmentize(shapely.box(*bounds), step)
    outline = shapely.geometry.shape(transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(dense)))
    geom = shapely.geometry.mapping(shapely.simplify(outline, 10**-COORD_DECIMALS))
    return {"type": geom["type"], "coordinates": _round_coords(geom["coordinates"])}, _outward(outline.bounds)


def _round_coords(coords):
    if isinstance(coords, (int, float)):
        return round(float(coords), COORD_DECIMALS)
    return [_round_coords(c) for c in coords]


def _outward(bounds: tuple[float, float, float, float]) -> list[float]:
    """Round a bbox outward to the coordinate precision, so it still contains the (rounded) geometry."""
    k = 10**COORD_DECIMALS
    w, s, e, n = bounds
    return [math.floor(w * k) / k, math.floor(s * k) / k, math.ceil(e * k) / k, math.ceil(n * k) / k]


def _time_range(run: dict, given: tuple[datetime, datetime] | None) -> tuple[datetime, datetime]:
    if given is not None:
        start, end = given
    elif run.get("start_datetime") and run.get("end_datetime"):
        start, end = (pystac.utils.str_to_datetime(run[k]) for k in ("start_datetime", "end_datetime"))
    elif run.get("datetime"):
        start = end = pystac.utils.str_to_datetime(run["datetime"])
    else:
        start = end = PLACEHOLDER_DATETIME
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"run {run['run']}: datetimes must carry a time zone (e.g. 2024-05-01T00:00:00Z)")
    if end < start:
        raise ValueError(f"run {run['run']}: end_datetime {end.isoformat()} is before start_datetime {start.isoformat()}")
    return start, end


# --- validation --------------------------------------------------------------------------------------------------
class OfflineSTACValidator(STACValidator):
    """JSON-schema validation against bundled schemas only: pystac's core + GeoJSON copies and ``engine/data``.

    A ``$ref`` or extension outside those is a :class:`~pystac.errors.STACValidationError` naming the schema,
    so validation can neither reach the network nor silently skip a part.
    """

    def __init__(self) -> None:
        schemas = dict(get_local_schema_cache())
        for uri, path in EXTENSION_SCHEMAS.items():
            schemas[uri] = json.loads(path.read_text())
        self.schemas = schemas
        self.registry = Registry(retrieve=_refuse_fetch).with_resources(
            (uri, Resource.from_contents(schema, default_specification=DRAFT7)) for uri, schema in schemas.items()
        ).crawl()

    def validate_core(self, stac_dict: dict[str, Any], stac_object_type: pystac.STACObjectType, stac_version: str,
                      href: str | None = None) -> str:
        uri = DefaultSchemaUriMap().get_object_schema_uri(stac_object_type, stac_version)
        if uri not in self.schemas:
            raise STACValidationError(f"{href}: no bundled schema for a STAC {stac_version} {stac_object_type.name.lower()} "
                                      f"(bundled: STAC {STAC_VERSION}); write it with this pystac or validate online")
        return self._check(uri, stac_dict, href)

    def validate_extension(self, stac_dict: dict[str, Any], stac_object_type: pystac.STACObjectType, stac_version: str,
                           extension_id: str, href: str | None = None) -> str:
        if extension_id not in self.schemas:
            raise STACValidationError(f"{href}: extension {extension_id} has no bundled schema (bundled: "
                                      f"{', '.join(EXTENSION_SCHEMAS)}); add its schema to engine/data to validate offline")
        return self._check(extension_id, stac_dict, href)

    def _check(self, uri: str, stac_dict: dict[str, Any], href: str | None) -> str:
        schema = self.schemas[uri]
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
        validator = cls(schema, registry=self.registry, format_checker=cls.FORMAT_CHECKER)
        try:
            errors = list(validator.iter_errors(stac_dict))
        except Unresolvable as exc:
            raise STACValidationError(f"{href}: schema {uri} refers to {exc}, which is not bundled "
                                      "(offline validation never downloads schemas)") from None
        if errors:
            best = jsonschema.exceptions.best_match(errors)
            raise STACValidationError(f"{href}: {_describe(best)} (schema {uri})", source=errors)
        return uri


def _describe(error: jsonschema.ValidationError, limit: int = 4) -> str:
    """``where: why`` of a schema error; for anyOf/oneOf the leaf reasons, not the repr of the whole instance."""
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    if not error.context:
        return f"{where}: {_shorten(error.message)}"
    leaves, stack = [], list(error.context)
    while stack:
        e = stack.pop(0)
        if e.context:
            stack.extend(e.context)
        else:
            path = "/".join(str(p) for p in e.absolute_path)
            leaves.append(f"{path + ': ' if path and path != where else ''}{_shorten(e.message)}")
    reasons = list(dict.fromkeys(leaves))
    more = f"; ... {len(reasons) - limit} more" if len(reasons) > limit else ""
    return f"{where}: matches none of the allowed forms ({'; '.join(reasons[:limit])}{more})"


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_fetch(uri: str) -> Resource:
    raise NoSuchResource(ref=uri)


def validate_stac(products_dir: str | os.PathLike[str]) -> int:
    """Validate ``stac/collection.json`` and every Item it links, offline, and check that every href resolves.

    Each document is checked against the STAC 1.1 core schema and each extension it declares (projection), using
    only bundled schemas; every relative link and asset href must name an existing file, and none may be absolute.

    Args:
        products_dir: the run's products folder.

    Returns:
        The number of STAC documents validated (the Collection and its Items).

    Raises:
        STACProductsError: listing every problem, one per line, naming the file.

    Example (after :func:`write_stac`)::

        validate_stac(Path("geolink-data/products/default"))
        3
    """
    products_dir = Path(products_dir).resolve()
    stac_dir = products_dir / STAC_DIR
    collection_path = stac_dir / COLLECTION_JSON
    if not collection_path.is_file():
        raise FileNotFoundError(f"products {products_dir}: no {STAC_DIR}/{COLLECTION_JSON}; run write_stac first")
    problems: list[str] = []
    validator = OfflineSTACValidator()
    collection = _read_json(collection_path, problems)
    docs = [(collection_path, collection, pystac.STACObjectType.COLLECTION)] if collection is not None else []
    item_links = [link for link in (collection or {}).get("links", []) if link.get("rel") == "item"]
    if collection is not None and not item_links:
        problems.append(f"{collection_path}: links no item")
    for link in item_links:
        path = Path(os.path.normpath(collection_path.parent / link.get("href", "")))
        if path.is_file() and (item := _read_json(path, problems)) is not None:
            docs.append((path, item, pystac.STACObjectType.ITEM))
    for path, doc, kind in docs:
        try:
            validate_dict(doc, stac_object_type=kind, stac_version=doc.get("stac_version") or STAC_VERSION,
                          extensions=list(doc.get("stac_extensions") or []), href=str(path), validator=validator)
        except STACValidationError as exc:
            problems.append(str(exc).splitlines()[0])
        except Exception as exc:  # a malformed document (wrong types where pystac looks) is a problem, not a crash
            problems.append(f"{path}: cannot be validated: {type(exc).__name__}: {exc}")
        problems.extend(_href_problems(path, doc))
    if problems:
        raise STACProductsError(f"STAC in {stac_dir} is invalid ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return len(docs)


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"{path}: not readable JSON: {exc}")
        return None
    if not isinstance(doc, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return doc


def _href_problems(path: Path, doc: dict) -> list[str]:
    """Every link and asset href must be relative and name an existing file (self-contained, copyable catalog)."""
    out = []
    refs = [(f"link rel={link.get('rel')}", link.get("href")) for link in doc.get("links") or [] if isinstance(link, dict)]
    refs += [(f"asset {key}", asset.get("href")) for key, asset in (doc.get("assets") or {}).items() if isinstance(asset, dict)]
    for what, href in refs:
        if not isinstance(href, str) or not href:
            out.append(f"{path}: {what} has no href")
        elif "://" in href or os.path.isabs(href):
            out.append(f"{path}: {what} href {href} is not relative; the catalog must be self-contained")
        elif not (path.parent / href).is_file():
            out.append(f"{path}: {what} href {href} does not resolve to a file")
    return out
