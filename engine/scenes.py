"""Real scenes (an image with its bbox and OSM GeoJSON, as in the GeoLink examples) into the catalog contract.

A scene directory holds ``image.jpg`` covering ``meta.json``'s ``bbox_wsen`` in EPSG:4326 (north up) and
``osm_{point,line,polygon}.geojson`` with tags in a ``label`` property. This writes a georeferenced GeoTIFF and
an OSM GeoParquet, and returns the catalog row, so real data runs through the same stages as synthetic cities.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_bounds

from engine.atomic import atomic_path
from engine.geo import WGS84
from engine.geoparquet import write_geoparquet
from engine.osm import read_label_geojson


def scene_slug(scene_dir: str | Path) -> str:
    """A catalog slug from a scene folder name (``a702502933_US_21`` -> ``a702502933_us_21``)."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", Path(scene_dir).name.lower()).strip("-_")
    if not slug:
        raise ValueError(f"{scene_dir}: cannot make a city slug from this folder name")
    return slug


def scene_to_city(scene_dir: str | Path, out_dir: str | Path, region: str = "real") -> dict:
    """Convert one scene into ``out_dir/<slug>/{imagery.tif,osm.parquet}`` and return its catalog row.

    Raises:
        FileNotFoundError: naming the scene file that is missing.
        ValueError: naming the scene when its bbox is not a (west, south, east, north) box.
    """
    scene_dir = Path(scene_dir)
    meta_path, image_path = scene_dir / "meta.json", scene_dir / "image.jpg"
    for p in (meta_path, image_path):
        if not p.is_file():
            raise FileNotFoundError(f"scene {scene_dir}: missing {p.name}")
    meta = json.loads(meta_path.read_text())
    west, south, east, north = (float(v) for v in meta["bbox_wsen"])
    if not (west < east and south < north):
        raise ValueError(f"scene {scene_dir}: bbox_wsen {meta['bbox_wsen']} is not (west, south, east, north)")
    slug = scene_slug(scene_dir)
    city_dir = Path(out_dir) / slug
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(image_path) as src:
            pixels = src.read()
    profile = dict(driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=pixels.shape[0], dtype=pixels.dtype.name,
                   crs=WGS84, transform=from_bounds(west, south, east, north, pixels.shape[2], pixels.shape[1]),
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", photometric="RGB")
    with atomic_path(city_dir / "imagery.tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(pixels)
    layers = sorted(scene_dir.glob("osm_*.geojson"))
    if not layers:
        raise FileNotFoundError(f"scene {scene_dir}: no osm_*.geojson files")
    write_geoparquet(read_label_geojson(layers), city_dir / "osm.parquet", WGS84)
    return {"city": slug, "region": region, "imagery": str(city_dir / "imagery.tif"), "osm": str(city_dir / "osm.parquet")}
