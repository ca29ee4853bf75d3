"""The offline page of a change run (``products/<change-run>/index.html``): what changed, where, and how sure it is.

Like the map run's page (engine.products.page): static HTML with inline CSS and PNGs beside it, nothing from a CDN.
It leads with the national and regional change (demolished, new and persistent UV area, the share of the earlier
UV land demolished), then the accuracy assessment's estimates, then one picture per city: the change map read from
the change COG's overviews (so hundreds of cities cost seconds each).
"""

from __future__ import annotations

import csv
import html
import json
import os
from pathlib import Path

import numpy as np
import rasterio
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rasterio.enums import Resampling

from engine.atomic import atomic_path
from engine.products.page import CSS as PAGE_CSS
from engine.change.codes import CHANGE_CLASSES, CHANGE_COLOURS, CHANGE_NODATA
from engine.product_layout import (
    ACCURACY_DIR,
    CHANGE_COG,
    CHANGE_POLYGONS_GPKG,
    CHANGE_POLYGONS_PARQUET,
    CHANGE_STATS_CSV,
    INDEX_HTML,
    STAC_DIR,
    city_folder,
    read_run,
)

CHANGE_PNG = "change.png"
LABELS = {"other": "other", "persistent_uv": "persistent UV", "demolished_uv": "demolished UV", "new_uv": "new UV"}
CSS = PAGE_CSS  # one look for both kinds of run


def write_change_page(products_dir: str | os.PathLike[str], max_px: int = 700) -> Path:
    """Write ``index.html`` and ``cities/<city>/change.png`` of a change run; returns the page's path.

    A city whose picture cannot be drawn is noted on the page and never stops the others."""
    products_dir = Path(products_dir).resolve()
    run = read_run(products_dir)
    rows = _stats_rows(products_dir / CHANGE_STATS_CSV)
    pictures, notes = {}, {}
    for row in (r for r in rows if r["level"] == "city"):
        cog = city_folder(products_dir, row["city"]) / CHANGE_COG
        if not cog.is_file():
            notes[row["city"]] = "not compared (no change map): see the change run's console report"
            continue
        try:
            pictures[row["city"]] = render_change(cog, city_folder(products_dir, row["city"]) / CHANGE_PNG, row["city"], max_px)
        except Exception as exc:  # noqa: BLE001 (a note on the page, never a missing page)
            notes[row["city"]] = f"picture failed: {type(exc).__name__}: {exc}"
    target = products_dir / INDEX_HTML
    with atomic_path(target) as tmp:
        tmp.write_text(_html(products_dir, run, rows, pictures, notes), encoding="utf-8")
    return target


def render_change(cog: Path, out_png: Path, title: str, max_px: int = 700) -> Path:
    """One city's change map as a PNG with its legend, from the COG's overviews (nearest: codes are categories)."""
    with rasterio.open(cog) as src:
        scale = max(1.0, max(src.width, src.height) / max_px)
        shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        codes = src.read(1, out_shape=shape, resampling=Resampling.nearest)
    rgb = np.full((*shape, 3), 255, np.uint8)
    for code, colour in CHANGE_COLOURS.items():
        rgb[codes == code] = colour
    rgb[codes == CHANGE_NODATA] = (255, 255, 255)
    fig = Figure(figsize=(7, 7 * shape[0] / shape[1] + 0.8), dpi=100)
    ax = fig.subplots()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    ax.legend(handles=[Patch(facecolor=np.array(CHANGE_COLOURS[i]) / 255, edgecolor="#888", label=LABELS[name])
                       for i, name in enumerate(CHANGE_CLASSES)], loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def _stats_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `geolink-engine change` first")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _num(value: str | None, factor: float = 1.0, pattern: str = "{:,.2f}") -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if number != number else html.escape(pattern.format(number * factor))


def _html(products_dir: Path, run: dict, rows: list[dict], pictures: dict[str, Path], notes: dict[str, str]) -> str:
    e = html.escape
    vintages = run.get("vintages") or ["?", "?"]
    title = f"Urban-village change {vintages[0]} to {vintages[-1]}: run {run['run']}"
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>",
           (f"<p>Map runs <code>{e(str(run.get('before')))}</code> ({e(str(vintages[0]))}) and <code>{e(str(run.get('after')))}</code> "
            f"({e(str(vintages[-1]))}), model <code>{e(str(run.get('model_version')))}</code>; misregistration tolerance "
            f"{e(str(run.get('tolerance_px')))} px (UV of one date with the other's within it is persistent).</p>")]
    links = [name for name in (CHANGE_STATS_CSV, CHANGE_POLYGONS_PARQUET, CHANGE_POLYGONS_GPKG) if (products_dir / name).is_file()]
    links.append(f"{STAC_DIR}/collection.json")  # written right after the page (it lists the page and its pictures)
    accuracy = products_dir / ACCURACY_DIR
    if accuracy.is_dir():
        links += [p.relative_to(products_dir).as_posix() for p in sorted(accuracy.glob("*")) if p.is_file() and not p.name.startswith(".")]
    out.append("<p>Files: " + " | ".join(f'<a href="{e(h)}">{e(h)}</a>' for h in links) + "</p>")
    out += ["<h2>Change by region</h2>", _table([r for r in rows if r["level"] != "city"], "region")]
    out += _accuracy_section(products_dir)
    out += ["<h2>Cities</h2>", _table([r for r in rows if r["level"] == "city"], "city")]
    for row in (r for r in rows if r["level"] == "city"):
        city = row["city"]
        out.append(f'<section id="city-{e(city)}"><h2>{e(city)}</h2>')
        if city in notes:
            out.append(f'<p class="note">{e(notes[city])}</p>')
        if city in pictures:
            out.append(f'<img src="{e(pictures[city].relative_to(products_dir).as_posix())}" alt="{e(city)}: change map" loading="lazy">')
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _table(rows: list[dict], key: str) -> str:
    e = html.escape
    head = (f"<tr><th>{'City' if key == 'city' else 'Domain'}</th><th>Cities</th><th>UV before (ha)</th><th>Demolished (ha)</th>"
            "<th>New (ha)</th><th>Persistent (ha)</th><th>Demolished share</th><th>Net change (ha)</th><th>Polygons before / after</th></tr>")
    body = []
    for r in rows:
        name = r["city"] if r["level"] == "city" else (r["region"] or "national")
        measured = r.get("before_uv_m2") not in (None, "")
        cells = [_num(r.get("cities"), 1, "{:,.0f}"), _num(r.get("before_uv_m2"), 1e-4), _num(r.get("demolished_uv_m2"), 1e-4),
                 _num(r.get("new_uv_m2"), 1e-4), _num(r.get("persistent_uv_m2"), 1e-4), _num(r.get("demolished_share"), 1, "{:.1%}"),
                 _num(r.get("net_change_m2"), 1e-4), f"{_num(r.get('polygons_before'), 1, '{:,.0f}')} / {_num(r.get('polygons_after'), 1, '{:,.0f}')}"]
        body.append(f'<tr class="{"" if measured else "failed"}"><td class="name">{e(name)}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def _accuracy_section(products_dir: Path) -> list[str]:
    """The assessment's national estimates (area per change class, user's and producer's accuracy) when it ran."""
    path = products_dir / ACCURACY_DIR / "report.json"
    if not path.is_file():
        return []
    out = ["<h2>Accuracy of the change map</h2>",
           f'<p>Design-based estimates from a stratified random sample of the change map, 95% confidence intervals '
           f'(<a href="{ACCURACY_DIR}/report.md">report.md</a>).</p>']
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return out
    charts = sorted((products_dir / ACCURACY_DIR).glob("*.png"))
    out += [f'<img src="{html.escape(p.relative_to(products_dir).as_posix())}" alt="{html.escape(p.stem)}">' for p in charts]
    if doc.get("status") not in (None, "done"):
        out.append(f'<p class="note">Awaiting labels: {html.escape(str(doc.get("status")))}</p>')
    return out
