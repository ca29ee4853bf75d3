"""The interactive web map of a run's products: ``map.html`` and its ``web/`` folder (MapLibre GL, offline).

What a dataset user expects of a product page is to pan and zoom, click a village and read its attributes, and jump
to a city. The page is written next to ``index.html``:

- the UV polygons as vector data, chosen by size: one GeoJSON file per city (``web/uv/<city>.geojson``, written by
  GDAL's GeoJSON driver at 7 decimals, about 1 cm) while the run has at most :data:`GEOJSON_MAX_FEATURES`
  villages; above that one PMTiles archive (``web/uv.pmtiles``, GDAL's PMTiles driver, zooms
  :data:`PMTILES_ZOOMS`), which the page reads by HTTP range requests (``geolink-engine serve``);
- per city, the UV probability as a raster overlay (``web/prob/<city>.png``) and the imagery under it
  (``web/imagery/<city>.jpg``), both warped to Web Mercator from the COG's and the imagery's overviews, so the
  overlay lines up with the vectors at every zoom;
- MapLibre GL JS and the PMTiles reader copied from the package (``engine/web/vendor``, installed from the npm
  registry by ``tools/vendor-web``), never a CDN: products are opened offline. No basemap: nothing is fetched
  from outside the products folder.

Each file is rewritten only when its bytes change, so a rerun leaves the folder as it was.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import rasterio
from matplotlib import colormaps
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import Affine, array_bounds
from rasterio.warp import reproject, transform_bounds

from engine.atomic import write_if_changed
from engine.products.page import read_band_decimated, read_decimated
from engine.product_layout import (
    INDEX_HTML,
    MAP_HTML,
    PROB_NODATA,
    PROB_SCALE,
    UV_PARQUET,
    UV_POPULATION_PARQUET,
    WEB_DIR,
    city_cogs,
    product_cities,
    read_city_stats,
    read_run,
)

PACKAGE_WEB = Path(__file__).resolve().parents[1] / "web"
VENDOR_FILES = ("maplibre-gl.js", "maplibre-gl.css", "pmtiles.js", "maplibre-gl.LICENSE.txt", "VENDOR.json")
STATIC_FILES = ("map.js", "map.css")
GEOJSON_MAX_FEATURES = 20_000  # about 10 MB of GeoJSON in all: above it the browser would parse too much at once
PMTILES_ZOOMS = (4, 15)  # national view to building blocks; MapLibre overzooms past 15
OVERLAY_MAX_PX = 1024  # longest side of a city's probability and imagery overlays
MIN_PROB_SHOWN = 0.05  # below: transparent, so the imagery stays readable
PROB_LEVELS = 20  # colour steps of the probability overlay (0.05 each)
WEB_MERCATOR = "EPSG:3857"
MAX_LAT = 85.0511  # Web Mercator's limit

# the attributes a click shows: column, label, unit, digits (the morphology and population columns when present)
POPUP_COLUMNS = (
    ("uv_id", "village", "", None), ("city", "city", "", None), ("region", "region", "", None),
    ("area_m2", "area", "m²", 0), ("mean_prob", "mean probability", "", 3), ("n_tiles", "tiles", "", 0),
    ("n_buildings", "buildings", "", 0), ("density_per_ha", "building density", "/ha", 1),
    ("coverage_ratio", "coverage ratio", "", 3), ("footprint_mean_m2", "mean footprint", "m²", 1),
    ("footprint_median_m2", "median footprint", "m²", 1), ("height_mean_m", "mean height", "m", 1),
    ("levels_mean", "mean storeys", "", 1), ("far", "floor-area ratio", "", 2), ("nn_spacing_m", "nearest-building spacing", "m", 1),
    ("population", "residents", "", 0), ("population_lo", "residents, 95% low", "", 0), ("population_hi", "residents, 95% high", "", 0),
)


def write_web_map(products_dir: str | os.PathLike[str], catalog_rows: list[dict] | None = None,
                  max_geojson_features: int = GEOJSON_MAX_FEATURES, overlay_px: int = OVERLAY_MAX_PX) -> Path:
    """Write ``map.html`` and ``web/`` for a stitched run (see the module docstring); returns ``map.html``.

    A city whose overlay cannot be drawn (imagery unreadable, say) is listed with its reason on the page and never
    stops the others; failed cities (no COGs) are listed without overlays.

    Args:
        products_dir: the run's products folder (``products/<run>``).
        catalog_rows: catalog rows (``city``, ``imagery``) for the imagery under the overlay; none: no imagery.
        max_geojson_features: most villages written as GeoJSON; above it, PMTiles.
        overlay_px: longest side of each city's overlays.
    """
    products_dir = Path(products_dir).resolve()
    run = read_run(products_dir)
    stats = read_city_stats(products_dir)
    rows = {r["city"]: r for r in (catalog_rows or []) if r.get("city")}
    web = products_dir / WEB_DIR
    for name in VENDOR_FILES:
        _copy_if_changed(PACKAGE_WEB / "vendor" / name, web / "vendor" / name)
    for name in STATIC_FILES:
        _copy_if_changed(PACKAGE_WEB / "static" / name, web / name)

    polygons = _read_villages(products_dir)
    columns = [c for c in POPUP_COLUMNS if c[0] in polygons.columns]
    vector = _write_vectors(polygons, [c[0] for c in columns], web, max_geojson_features)
    by_city = {r["city"]: r for r in stats}
    counts = polygons["city"].value_counts().to_dict() if len(polygons) else {}

    def one(city: str) -> dict:
        row = by_city.get(city) or {}
        entry = {"city": city, "region": row.get("region") or (rows.get(city) or {}).get("region") or "",
                 "polygons": int(counts.get(city, 0)),
                 "uv_area_ha": None if row.get("uv_area_m2") is None else round(row["uv_area_m2"] / 1e4, 2),
                 "uv_share": row.get("uv_share"), "failed": not row.get("tiles_ok"), "overlays": {}, "note": ""}
        cogs = city_cogs(products_dir, city)
        try:
            if "uv_prob" in cogs:
                entry["overlays"]["probability"] = _probability_overlay(cogs["uv_prob"], web / "prob" / f"{city}.png", overlay_px)
                entry["bounds"] = entry["overlays"]["probability"]["bounds"]
            imagery = (rows.get(city) or {}).get("imagery")
            if imagery and "uv_prob" in cogs:
                entry["overlays"]["imagery"] = _imagery_overlay(imagery, web / "imagery" / f"{city}.jpg", overlay_px)
        except Exception as exc:  # noqa: BLE001 (one unreadable city is a note on the page, never a missing page)
            entry["note"] = f"overlay failed: {type(exc).__name__}: {exc}"
        if "bounds" not in entry and entry["polygons"]:
            entry["bounds"] = [round(v, 6) for v in polygons[polygons["city"] == city].total_bounds.tolist()]
        return entry

    # GDAL's reads and warps and the PNG/JPEG encoders release the GIL: a national run's overlays on every core
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8))) as pool:
        cities = list(pool.map(one, product_cities(products_dir, stats)))
    boxes = [c["bounds"] for c in cities if c.get("bounds")]
    manifest = {
        "run": run["run"], "model_version": run["model_version"], "vector": vector,
        "columns": [{"name": n, "label": label, "unit": unit, "digits": d} for n, label, unit, d in columns],
        "cities": cities, "villages": int(len(polygons)),
        "bounds": [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)] if boxes else [-180, -60, 180, 75],
        "prob_legend": {"min_shown": MIN_PROB_SHOWN, "colours": _legend_colours()},
    }
    target = products_dir / MAP_HTML
    write_if_changed(target, _page(run, manifest).encode())
    return target


# --- vectors -----------------------------------------------------------------------------------------------------
def _read_villages(products_dir: Path) -> gpd.GeoDataFrame:
    """The villages with their popup columns and, after ``map --population-model``, their residents."""
    path = products_dir / UV_PARQUET
    if not path.is_file():
        return gpd.GeoDataFrame({"uv_id": [], "city": []}, geometry=gpd.GeoSeries([], crs="EPSG:4326"))
    villages = gpd.read_parquet(path)
    keep = [c[0] for c in POPUP_COLUMNS if c[0] in villages.columns]
    villages = villages[[*keep, villages.geometry.name]]
    people = products_dir / UV_POPULATION_PARQUET
    if people.is_file() and "uv_id" in villages.columns:
        present = set(pq.read_schema(people).names)
        extra = [c for c in ("population", "population_lo", "population_hi") if c in present and c not in villages.columns]
        if extra:
            villages = villages.merge(pd.read_parquet(people, columns=["uv_id", *extra]), on="uv_id", how="left")
    return villages.to_crs(4326) if villages.crs is not None and villages.crs.to_epsg() != 4326 else villages


def _write_vectors(polygons: gpd.GeoDataFrame, columns: list[str], web: Path, max_geojson: int) -> dict:
    """GeoJSON per city, or one PMTiles archive above ``max_geojson`` villages; the page's description of them.

    The other form's files are removed, so a run that grew past the threshold does not keep stale GeoJSON."""
    folder, archive = web / "uv", web / "uv.pmtiles"
    data = polygons[[*columns, polygons.geometry.name]] if len(polygons) else polygons
    if len(polygons) <= max_geojson:
        archive.unlink(missing_ok=True)
        files = {}
        for city, part in (data.groupby("city", sort=True) if len(data) else []):
            path = folder / f"{city}.geojson"
            _write_vector_file(part.reset_index(drop=True), path, "GeoJSON", layer_options={"COORDINATE_PRECISION": "7", "RFC7946": "YES"})
            files[city] = f"{WEB_DIR}/uv/{city}.geojson"
        for stale in folder.glob("*.geojson") if folder.is_dir() else []:
            if stale.stem not in files:
                stale.unlink()
        return {"kind": "geojson", "files": files}
    shutil.rmtree(folder, ignore_errors=True)
    _write_vector_file(data.reset_index(drop=True), archive, "PMTiles", layer="uv",
                       dataset_options={"MINZOOM": str(PMTILES_ZOOMS[0]), "MAXZOOM": str(PMTILES_ZOOMS[1]), "NAME": "urban villages"})
    return {"kind": "pmtiles", "url": f"{WEB_DIR}/uv.pmtiles", "layer": "uv", "minzoom": PMTILES_ZOOMS[0], "maxzoom": PMTILES_ZOOMS[1]}


def _write_vector_file(gdf: gpd.GeoDataFrame, path: Path, driver: str, **options) -> None:
    """One vector file through GDAL (pyogrio), written beside its target and moved in when its bytes changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        pyogrio.write_dataframe(gdf, tmp, driver=driver, **options)
        _move_if_changed(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- overlays ----------------------------------------------------------------------------------------------------
def _mercator_grid(crs, bounds: tuple[float, float, float, float], max_px: int) -> tuple[Affine, int, int]:
    """A Web Mercator grid over ``bounds`` (in ``crs``; latitudes clipped to Mercator's range), square pixels,
    longest side ``max_px``."""
    w, s, e, n = transform_bounds(crs, "EPSG:4326", *bounds)
    left, bottom, right, top = transform_bounds("EPSG:4326", WEB_MERCATOR, w, max(s, -MAX_LAT), e, min(n, MAX_LAT))
    res = max(right - left, top - bottom) / max_px
    width, height = max(1, math.ceil((right - left) / res)), max(1, math.ceil((top - bottom) / res))
    return Affine(res, 0, left, 0, -res, top), width, height


def _corners(transform: Affine, width: int, height: int) -> tuple[list[list[float]], list[float]]:
    """MapLibre image-source corners (top-left, top-right, bottom-right, bottom-left, lon/lat) and lon/lat bounds."""
    from pyproj import Transformer

    left, bottom, right, top = array_bounds(height, width, transform)
    to_lonlat = Transformer.from_crs(WEB_MERCATOR, 4326, always_xy=True)
    (w, e), (s, n) = to_lonlat.transform([left, right], [bottom, top])
    corners = [[w, n], [e, n], [e, s], [w, s]]
    return [[round(x, 7), round(y, 7)] for x, y in corners], [round(w, 7), round(s, 7), round(e, 7), round(n, 7)]


def _probability_overlay(cog: Path, out_png: Path, max_px: int) -> dict:
    """p(urban village) of a city as an RGBA PNG in Web Mercator: the inferno ramp, transparent below
    :data:`MIN_PROB_SHOWN` and outside the mapped area. Read from the COG's overviews (nearest), never in full."""
    with rasterio.open(cog) as src:
        transform, width, height = _mercator_grid(src.crs, src.bounds, max_px)
        small, small_transform = read_band_decimated(src, 2 * max_px)  # about twice the output resolution
        prob = np.full((height, width), PROB_NODATA, np.uint8)
        reproject(small, prob, src_transform=small_transform, src_crs=src.crs, src_nodata=PROB_NODATA,
                  dst_transform=transform, dst_crs=WEB_MERCATOR, dst_nodata=PROB_NODATA, resampling=Resampling.nearest)
    # a palette PNG of PROB_LEVELS steps (index 0 transparent): a tenth of the bytes of RGBA, and the steps are
    # finer than anyone reads off a colour ramp
    p = prob.astype(np.float32) / PROB_SCALE
    level = np.clip(np.ceil(p * PROB_LEVELS), 1, PROB_LEVELS).astype(np.uint8)
    index = np.where((prob == PROB_NODATA) | (p < MIN_PROB_SHOWN), 0, level).astype(np.uint8)
    ramp = (colormaps["inferno"]((np.arange(1, PROB_LEVELS + 1) - 0.5) / PROB_LEVELS)[:, :3] * 255).round().astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 0, *ramp.ravel().tolist()])
    image.info["transparency"] = 0
    write_if_changed(out_png, _png_bytes(image))
    corners, bounds = _corners(transform, width, height)
    return {"url": out_png.relative_to(out_png.parents[2]).as_posix(), "coordinates": corners, "bounds": bounds}


def _imagery_overlay(imagery: str, out_jpg: Path, max_px: int) -> dict:
    """The imagery under a city's overlays: RGB, 2-98 % stretch per band (as the preview page), Web Mercator JPEG."""
    rgb, crs, small_transform, shape = read_decimated(imagery, 2 * max_px)  # the preview page's read and stretch
    transform, width, height = _mercator_grid(crs, array_bounds(*shape, small_transform), max_px)
    out = np.zeros((3, height, width), np.uint8)
    reproject((np.moveaxis(rgb, -1, 0) * 255).astype(np.uint8), out, src_transform=small_transform, src_crs=crs,
              dst_transform=transform, dst_crs=WEB_MERCATOR, resampling=Resampling.bilinear)
    write_if_changed(out_jpg, _jpeg_bytes(Image.fromarray(np.moveaxis(out, 0, -1), "RGB")))
    corners, bounds = _corners(transform, width, height)
    return {"url": out_jpg.relative_to(out_jpg.parents[2]).as_posix(), "coordinates": corners, "bounds": bounds}


def _legend_colours(steps: int = 6) -> list[str]:
    ramp = colormaps["inferno"](np.linspace(0, 1, steps))
    return ["#%02x%02x%02x" % tuple(int(round(v * 255)) for v in c[:3]) for c in ramp]


# --- files -------------------------------------------------------------------------------------------------------
def _png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, transparency=image.info.get("transparency"))
    return buf.getvalue()


def _jpeg_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82, optimize=True)
    return buf.getvalue()


def _copy_if_changed(source: Path, target: Path) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing from the installed package: reinstall geolink-engine "
                                f"(the web map's JS comes from engine/web/vendor, see tools/vendor-web)")
    write_if_changed(target, source.read_bytes())


def _move_if_changed(tmp: Path, path: Path) -> None:
    if path.is_file() and path.stat().st_size == tmp.stat().st_size and path.read_bytes() == tmp.read_bytes():
        return
    os.replace(tmp, path)


# --- page --------------------------------------------------------------------------------------------------------
def _page(run: dict, manifest: dict) -> str:
    """``map.html``: the map, a city list and a legend; the manifest inlined as JSON (no fetch needed for it)."""
    e = html.escape
    title = f"Urban villages map: run {run['run']}, model {run['model_version']}"
    data = json.dumps(manifest, separators=(",", ":"), allow_nan=False, default=_json_default).replace("</", "<\\/")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # the page may load nothing from outside its folder (opened offline, and no request leaves the machine)
        ('<meta http-equiv="Content-Security-Policy" content="default-src \'self\'; script-src \'self\'; '
         "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; worker-src 'self' blob:; "
         "child-src 'self' blob:; object-src 'none'; base-uri 'none'\">"),
        f"<title>{e(title)}</title>", '<link rel="icon" href="data:,">',
        f'<link rel="stylesheet" href="{WEB_DIR}/vendor/maplibre-gl.css">', f'<link rel="stylesheet" href="{WEB_DIR}/map.css">',
        "</head>", "<body>",
        '<aside id="panel">',
        f"<h1>Urban villages</h1><p class=\"sub\">run <b>{e(run['run'])}</b>, model {e(str(run['model_version']))} · "
        f'<a href="{INDEX_HTML}">summary page</a></p>',
        '<div id="layers"><label><input type="checkbox" id="show-imagery" checked> imagery</label>'
        '<label><input type="checkbox" id="show-prob" checked> UV probability</label>'
        '<label><input type="checkbox" id="show-uv" checked> UV polygons</label></div>',
        '<div id="legend"></div>',
        '<input id="filter" type="search" placeholder="filter cities" aria-label="filter cities">',
        '<ol id="cities"></ol>', '<p id="status" role="status"></p>', "</aside>",
        '<div id="map"></div>',
        f'<script id="geolink-manifest" type="application/json">{data}</script>',
        f'<script src="{WEB_DIR}/vendor/maplibre-gl.js"></script>', f'<script src="{WEB_DIR}/vendor/pmtiles.js"></script>',
        f'<script src="{WEB_DIR}/map.js"></script>', "</body>", "</html>", "",
    ])


def _json_default(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
