"""Preview pictures: a city's imagery with its OSM features and reference polygons drawn over it.

Reads a decimated overview of the imagery (never the whole raster at full resolution), so a preview of a large
city costs about as much as one of a small one.
"""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from engine import storage
from engine.atomic import atomic_path

CLASS_COLOURS = {
    "urban_village": "#ff2d2d",
    "formal_residential": "#ffd23f",
    "commercial": "#3fa7ff",
    "industrial": "#b04dff",
    "institutional": "#ff8c1a",
    "green": "#3ddc84",
    "water": "#00e5ff",
    "farmland": "#c7e86b",
    "vacant": "#b9a27a",
}


def render_preview(row: dict, out_png: str | os.PathLike[str], max_px: int = 900) -> Path:
    """Write a PNG of one catalog row: imagery, OSM (lines, polygon outlines, points) and reference outlines.

    Args:
        row: a catalog row (``city``, ``imagery``, ``osm``, optional ``reference``), paths already resolved.
        out_png: where to write the picture (atomically).
        max_px: longest side of the imagery as drawn.
    """
    with rasterio.open(row["imagery"]) as src:
        scale = max(1.0, max(src.width, src.height) / max_px)
        shape = (3, int(src.height / scale), int(src.width / scale))
        rgb = src.read([1, 2, 3], out_shape=shape, resampling=rasterio.enums.Resampling.average)
        crs, bounds = src.crs, src.bounds
    extent = (bounds.left, bounds.right, bounds.bottom, bounds.top)
    fig = Figure(figsize=(16, 8.4), dpi=100)  # object-oriented: no pyplot, no global figure or backend state
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.imshow(np.transpose(rgb, (1, 2, 0)), extent=extent)
        ax.set_xlim(bounds.left, bounds.right)
        ax.set_ylim(bounds.bottom, bounds.top)
        ax.set_xticks([])
        ax.set_yticks([])

    osm = gpd.read_parquet(storage.local_path(row["osm"]), columns=["kind", "geometry"]).to_crs(crs)
    ax = axes[0]
    polys = osm[osm["kind"] == "polygon"]
    lines = osm[osm["kind"] == "line"]
    points = osm[osm["kind"] == "point"]
    if len(polys):
        polys.boundary.plot(ax=ax, color="#ffe066", linewidth=0.5)
    if len(lines):
        lines.plot(ax=ax, color="#ffffff", linewidth=0.8)
    if len(points):
        points.plot(ax=ax, color="#ff4fd8", markersize=5)
    ax.set_title(f"{row['city']}: OSM ({len(points)} points, {len(lines)} lines, {len(polys)} polygons)")
    ax.legend(handles=[Line2D([], [], color="#ffffff", label="line"), Line2D([], [], color="#ffe066", label="polygon"),
                       Line2D([], [], color="#ff4fd8", marker="o", linestyle="", label="point")], loc="lower right", fontsize=8)

    ax = axes[1]
    if row.get("reference"):
        ref = gpd.read_parquet(storage.local_path(row["reference"])).to_crs(crs)
        for cls, part in ref.groupby("class"):
            part.boundary.plot(ax=ax, color=CLASS_COLOURS.get(cls, "#ffffff"), linewidth=1.4 if cls == "urban_village" else 0.7)
        present = [c for c in CLASS_COLOURS if c in set(ref["class"])]
        ax.legend(handles=[Patch(facecolor="none", edgecolor=CLASS_COLOURS[c], label=c) for c in present], loc="lower right", fontsize=8)
        ax.set_title(f"{row['city']}: reference land use ({len(ref)} polygons)")
    else:
        ax.set_title(f"{row['city']}: imagery ({crs.to_string()})")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png
