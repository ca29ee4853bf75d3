"""A static, offline preview page of a run's products: summary table, one picture per city, a national overview.

Why static HTML with inline CSS and PNGs beside it: the page is opened from a copied folder on machines without
internet, so nothing may come from a CDN. Pictures read decimated overviews of the imagery and the probability
COG (never a whole raster at full resolution), so a page over hundreds of cities costs seconds per city.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject, transform_bounds

from engine.atomic import atomic_path
from engine.product_layout import (
    ACCURACY_DIR,
    CITY_COGS,
    CITY_STATS,
    INDEX_HTML,
    MAP_HTML,
    MORPHOLOGY_CSV,
    MORPHOLOGY_PNG,
    OVERVIEW_PNG,
    POPULATION_CSV,
    POPULATION_PNG,
    PREVIEW_PNG,
    PROB_NODATA,
    PROB_SCALE,
    REGIONS_CSV,
    REGIONS_PNG,
    STAC_DIR,
    UV_GPKG,
    UV_PARQUET,
    UV_POPULATION_PARQUET,
    city_cogs,
    city_folder,
    product_cities,
    read_city_stats,
    read_run,
)

OUTLINE_COLOUR = "#00e5ff"
MIN_PROB_SHOWN = 0.05  # below this the overlay is transparent, so the imagery stays readable


def write_page(products_dir: str | os.PathLike[str], catalog_rows: list[dict], max_px: int = 800, link_stac: bool | None = None) -> Path:
    """Write ``index.html``, ``cities/<city>/preview.png`` for every city with products, and ``overview.png``.

    A city whose picture cannot be drawn (imagery unreadable, say) is reported on the page and never stops the
    others; failed cities (no tile ok, or no COGs) are highlighted in the table.

    Args:
        products_dir: the run's products folder (``products/<run>``).
        catalog_rows: catalog rows (``city``, ``imagery`` resolved, optional ``region``); a city without a row is
            drawn on its probability grid without imagery.
        max_px: longest side of each city picture's raster, in pixels.
        link_stac: link ``stac/collection.json``; default: when it exists (the pipeline writes the page first, so
            the collection can list the page and its pictures, then the STAC: it passes True).

    Returns:
        The path of ``index.html``.

    Example (on a stitched run's products; ``tests/test_products.py`` runs it on real ones)::

        write_page(Path("geolink-data/products/default"), load_catalog("geolink-data/catalog.yaml").to_pylist())
        PosixPath('products/demo/index.html')
    """
    products_dir = Path(products_dir).resolve()
    run = read_run(products_dir)
    stats = read_city_stats(products_dir)
    rows = {r["city"]: r for r in catalog_rows if r.get("city")}
    polygons = _read_polygons(products_dir)
    cities = product_cities(products_dir, stats)
    previews: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for city in cities:
        cogs = city_cogs(products_dir, city)
        if "uv_prob" not in cogs:
            notes[city] = "no products: the city failed (no uv_prob.tif)"
            continue
        imagery = (rows.get(city) or {}).get("imagery")
        try:
            previews[city] = render_city_preview(city, imagery, cogs["uv_prob"], polygons[polygons["city"] == city],
                                                 city_folder(products_dir, city) / PREVIEW_PNG, max_px=max_px)
        except Exception as exc:  # one unreadable city is a note on the page, never a missing page
            notes[city] = f"preview failed: {type(exc).__name__}: {exc}"
        if imagery is None and city not in notes:
            notes[city] = "imagery not in the catalog rows: probability drawn without imagery"
    overview = render_overview(products_dir, stats, rows, products_dir / OVERVIEW_PNG)
    if link_stac is None:
        link_stac = (products_dir / STAC_DIR / "collection.json").is_file()
    page = _page_html(products_dir, run, stats, cities, previews, notes, overview, link_stac)
    target = products_dir / INDEX_HTML
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target


# --- pictures ----------------------------------------------------------------------------------------------------
def render_city_preview(city: str, imagery: str | None, uv_prob: Path, polygons: gpd.GeoDataFrame,
                        out_png: Path, max_px: int = 800) -> Path:
    """One city's PNG: imagery (decimated), UV probability as a semi-transparent overlay, UV polygons outlined.

    Everything is drawn on the imagery's decimated grid (the probability is reprojected onto it, polygons are
    reprojected to its CRS); without imagery the probability COG's own grid is used.
    """
    rgb = None
    if imagery:
        rgb, crs, transform, shape = read_decimated(imagery, max_px)
    with rasterio.open(uv_prob) as src:
        if rgb is None:
            crs, transform, shape = src.crs, *decimated_grid(src, max_px)
        prob_small, prob_transform = read_band_decimated(src, max_px)
        prob = np.full(shape, PROB_NODATA, np.uint8)
        reproject(prob_small, prob, src_transform=prob_transform, src_crs=src.crs, src_nodata=PROB_NODATA,
                  dst_transform=transform, dst_crs=crs, dst_nodata=PROB_NODATA, resampling=Resampling.nearest)
    height, width = shape
    left, top = transform @ (0, 0)
    right, bottom = transform @ (width, height)
    extent = (left, right, bottom, top)

    fig = Figure(figsize=(8, 8 * height / width + 0.6), dpi=100)  # object-oriented: no pyplot, no global state
    ax = fig.subplots()
    if rgb is not None:
        ax.imshow(rgb, extent=extent, interpolation="nearest")
    else:
        ax.set_facecolor("#202020")
    p = np.ma.masked_where((prob == PROB_NODATA) | (prob < MIN_PROB_SHOWN * PROB_SCALE), prob / PROB_SCALE)
    overlay = ax.imshow(p, extent=extent, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.5, interpolation="nearest")
    fig.colorbar(overlay, ax=ax, fraction=0.035, pad=0.02, label="UV probability")
    if len(polygons):
        polygons.to_crs(crs).boundary.plot(ax=ax, color=OUTLINE_COLOUR, linewidth=1.0)
    ax.legend(handles=[Line2D([], [], color=OUTLINE_COLOUR, label=f"UV polygons ({len(polygons)})")], loc="lower right", fontsize=8)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("")  # geopandas labels geographic axes; the picture has no ticks to label
    ax.set_ylabel("")
    ax.set_title(f"{city}" + ("" if rgb is not None else " (no imagery)"))
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def render_overview(products_dir: Path, stats: list[dict], rows: dict[str, dict], out_png: Path) -> Path | None:
    """National overview: one point per city at its raster's centre (EPSG:4326), coloured by UV share.

    Failed cities are drawn as red crosses where their location is known (COG or catalog imagery); returns ``None``
    when no city has a location.
    """
    points = []
    for row in stats:
        city = row["city"]
        cogs = city_cogs(products_dir, city)
        source = cogs.get("uv_prob") or cogs.get("class") or (rows.get(city) or {}).get("imagery")
        if not source:
            continue
        try:
            with rasterio.open(source) as src:
                w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        except (rasterio.errors.RasterioError, ValueError):
            continue
        points.append((city, (w + e) / 2, (s + n) / 2, row.get("uv_share"), not cogs or not row.get("tiles_ok")))
    if not points:
        return None
    fig = Figure(figsize=(8, 6), dpi=100)
    ax = fig.subplots()
    ok = [p for p in points if not p[4] and p[3] is not None]
    if ok:
        sc = ax.scatter([p[1] for p in ok], [p[2] for p in ok], c=[p[3] for p in ok], cmap="viridis", s=60, edgecolors="k",
                        vmin=0.0, vmax=max(0.01, max(p[3] for p in ok)))
        fig.colorbar(sc, ax=ax, label="UV share of built-up area")
    failed = [p for p in points if p[4]]
    no_share = [p for p in points if p not in ok and not p[4]]  # mapped, but the model cannot tell built-up land
    if failed:
        ax.scatter([p[1] for p in failed], [p[2] for p in failed], marker="x", color="red", s=60, label="failed")
    if no_share:
        ax.scatter([p[1] for p in no_share], [p[2] for p in no_share], marker="o", facecolors="none", edgecolors="grey", s=60,
                   label="mapped; UV share not measured (run.json built_up)")
    if failed or no_share:
        ax.legend(loc="lower right", fontsize=8)
    if len(points) <= 60:
        for city, x, y, *_ in points:
            ax.annotate(city, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"UV share by city ({len(points)} cities)")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def decimated_grid(src: rasterio.DatasetReader, max_px: int) -> tuple[Affine, tuple[int, int]]:
    """Transform and ``(height, width)`` of ``src`` shrunk so its longest side is at most ``max_px``."""
    scale = max(1.0, max(src.width, src.height) / max_px)
    shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale)))
    return src.transform @ Affine.scale(src.width / shape[1], src.height / shape[0]), shape


def read_band_decimated(src: rasterio.DatasetReader, max_px: int) -> tuple[np.ndarray, Affine]:
    transform, shape = decimated_grid(src, max_px)
    return src.read(1, out_shape=shape, resampling=Resampling.nearest), transform


def read_decimated(path: str, max_px: int) -> tuple[np.ndarray, object, Affine, tuple[int, int]]:
    """Imagery as float RGB in [0, 1] on a decimated grid (read through the overviews), stretched 2-98 %."""
    with rasterio.open(path) as src:
        if src.crs is None:
            raise ValueError(f"imagery {path} has no CRS")
        transform, shape = decimated_grid(src, max_px)
        bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
        data = src.read(bands, out_shape=(3, *shape), resampling=Resampling.average, masked=True).astype(np.float32)
        crs = src.crs
    valid = ~np.ma.getmaskarray(data).any(axis=0)
    out = np.zeros((*shape, 3), np.float32)
    if valid.any():
        filled = data.filled(0)
        for b in range(3):
            lo, hi = np.percentile(filled[b][valid], (2, 98))
            out[..., b] = np.clip((filled[b] - lo) / max(hi - lo, 1e-6), 0, 1)
    out[~valid] = 0.0
    return out, crs, transform, shape


def _read_polygons(products_dir: Path) -> gpd.GeoDataFrame:
    """The national UV polygons (``city``, ``geometry``), or an empty frame when the file is absent."""
    path = products_dir / UV_PARQUET
    if not path.is_file():
        return gpd.GeoDataFrame({"city": []}, geometry=gpd.GeoSeries([], crs="EPSG:4326"))
    return gpd.read_parquet(path, columns=["city", "geometry"])


# --- HTML --------------------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f0f0f0; }
td.name { text-align: left; }
tr.failed td { background: #ffd6d6; }
tr.partial td { background: #fff1c9; }
section { margin: 2em 0; }
img { max-width: 100%; border: 1px solid #ccc; }
p.note { color: #a00; }
p.map a { font-size: 1.2em; font-weight: 600; }
"""


def _page_html(products_dir: Path, run: dict, stats: list[dict], cities: list[str], previews: dict[str, Path],
               notes: dict[str, str], overview: Path | None, link_stac: bool) -> str:
    e = html.escape
    title = f"Urban villages: run {run['run']}, model {run['model_version']}"
    by_city = {r["city"]: r for r in stats}
    failed = [c for c in cities if _status(by_city.get(c), c in previews or "uv_prob" in city_cogs(products_dir, c)) == "failed"]
    out = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>",
        (f"<p>Mode <code>{e(str(run.get('mode', '?')))}</code>, tiles {e(str(run.get('tile_size_px', '?')))} px with "
         f"{e(str(run.get('overlap_px', '?')))} px overlap, classes {e(', '.join(run.get('classes', [])))}. "
         f"{len(cities)} cities, {len(failed)} failed{': ' + e(', '.join(failed)) if failed else ''}.</p>"),
    ]
    links = [(name, name) for name in (UV_PARQUET, UV_GPKG, CITY_STATS, REGIONS_CSV, MORPHOLOGY_CSV, POPULATION_CSV, UV_POPULATION_PARQUET)
             if (products_dir / name).is_file()]
    if link_stac:
        links.append((f"{STAC_DIR}/collection.json", "STAC collection"))
    accuracy = products_dir / ACCURACY_DIR
    if accuracy.is_dir():
        links += [(p.relative_to(products_dir).as_posix(), p.relative_to(products_dir).as_posix())
                  for p in sorted(accuracy.glob("*")) if p.is_file() and not p.name.startswith(".")]
    if (products_dir / MAP_HTML).is_file():  # engine.products.webmap: pan, zoom, click a village
        out.append(f'<p class="map"><a href="{MAP_HTML}">Open the interactive map</a> (UV polygons, probability and '
                   f'imagery per city; offline, or through <code>geolink-engine serve --run {e(run["run"])}</code>)</p>')
    out.append("<p>Files: " + " | ".join(f'<a href="{e(href)}">{e(label)}</a>' for href, label in links) + "</p>")
    if overview is not None:
        out.append(f'<img src="{e(overview.name)}" alt="UV share by city">')
    if (products_dir / REGIONS_PNG).is_file():  # GeoLink-UV's headline: prevalence by region, with its intervals
        out.append(f'<h2>Regions</h2><p>UV share of built-up land per region: the map\'s value and the design-based '
                   f'estimate with its 95% confidence interval (<a href="{REGIONS_CSV}">{REGIONS_CSV}</a>).</p>'
                   f'<img src="{REGIONS_PNG}" alt="UV share of built-up land by region">')
    if (products_dir / MORPHOLOGY_PNG).is_file():
        out.append(f'<h2>Building morphology</h2><p>Urban villages against formal residential land, per region '
                   f'(<a href="{MORPHOLOGY_CSV}">{MORPHOLOGY_CSV}</a>; per village in {UV_PARQUET}).</p>'
                   f'<img src="{MORPHOLOGY_PNG}" alt="building morphology by region">')
    if (products_dir / POPULATION_PNG).is_file():  # `map --population-model`
        out.append(f'<h2>Population</h2><p>Residents per region and their share living in urban villages, with 95% '
                   f'prediction intervals from the population model\'s held-out cities (<a href="{POPULATION_CSV}">{POPULATION_CSV}</a>; '
                   f'per village in {UV_POPULATION_PARQUET}).</p><img src="{POPULATION_PNG}" alt="population by region">')
    charts = sorted(accuracy.glob("*.png")) if accuracy.is_dir() else []
    if charts:  # the accuracy assessment's pictures, when `assess` has run
        out.append('<h2>Accuracy</h2><p>Design-based estimates with 95% confidence intervals: see '
                   f'<a href="{ACCURACY_DIR}/report.md">report.md</a>.</p>')
        out += [f'<img src="{e(p.relative_to(products_dir).as_posix())}" alt="{e(p.stem)}">' for p in charts]

    out += ["<h2>Cities</h2>", "<table>", ("<tr><th>City</th><th>Region</th><th>UV area (ha)</th><th>Built-up area (ha)</th>"
                                           "<th>UV share</th><th>Polygons</th><th>Tiles ok</th><th>Tiles failed</th></tr>")]
    for city in cities:
        row = by_city.get(city) or {}
        status = _status(by_city.get(city), city in previews or "uv_prob" in city_cogs(products_dir, city))
        cells = [_fmt(row.get("uv_area_m2"), 1e-4, "{:,.1f}"), _fmt(row.get("built_up_area_m2"), 1e-4, "{:,.1f}"),
                 _fmt(row.get("uv_share"), 1.0, "{:.1%}"), _fmt(row.get("polygons")), _fmt(row.get("tiles_ok")),
                 _fmt(row.get("tiles_failed"))]
        out.append(f'<tr class="{status}"><td class="name"><a href="#city-{e(city)}">{e(city)}</a></td>'
                   f'<td class="name">{e(str(row.get("region") or ""))}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")

    for city in cities:
        out.append(f'<section id="city-{e(city)}"><h2>{e(city)}</h2>')
        if city in notes:
            out.append(f'<p class="note">{e(notes[city])}</p>')
        if city in previews:
            rel = previews[city].relative_to(products_dir).as_posix()
            out.append(f'<img src="{e(rel)}" alt="{e(city)}: imagery, UV probability and polygons" loading="lazy">')
        cogs = city_cogs(products_dir, city)
        if cogs:
            out.append("<p>" + " | ".join(f'<a href="{e(p.relative_to(products_dir).as_posix())}">{e(CITY_COGS[k])}</a>'
                                          for k, p in cogs.items()) + "</p>")
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _status(row: dict | None, has_products: bool) -> str:
    """``failed`` (no products or no tile ok), ``partial`` (some tiles failed) or ``ok``."""
    if not has_products or (row is not None and not row.get("tiles_ok")):
        return "failed"
    return "partial" if row and row.get("tiles_failed") else "ok"


def _fmt(value, factor: float = 1.0, pattern: str = "{:,}") -> str:
    return "" if value is None else html.escape(pattern.format(value * factor if factor != 1.0 else value))
