"""Real inputs in the forms users hold them, made from the real GeoLink example scenes (data nobody here made).

Each function takes a scene converted by :func:`engine.scenes.scene_to_city` (an EPSG:4326 GeoTIFF and its OSM)
and writes one variant: the same pixels warped to another CRS, stored as 16-bit with a fourth band, half nodata,
a truncated file. Seeded and small (a few hundred KB in all), so tests can build them in ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import rasterio
import shapely
from rasterio.warp import Resampling, calculate_default_transform, reproject

from engine.geo import utm_epsg_for


def warp(src_path: str | Path, out: Path, crs: str) -> Path:
    """The raster warped into ``crs`` (bilinear, square pixels, tiled COG layout with overviews)."""
    with rasterio.open(src_path) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        # square pixels: the grid refuses anything else
        res = max(abs(transform.a), abs(transform.e))
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds, resolution=res)
        data = np.zeros((src.count, height, width), np.uint8)
        for band in range(src.count):
            reproject(src.read(band + 1), data[band], src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                      dst_crs=crs, resampling=Resampling.bilinear, dst_nodata=0)
    return write_cog(out, data, crs, transform)


def utm_of(src_path: str | Path) -> str:
    with rasterio.open(src_path) as src:
        from rasterio.warp import transform_bounds

        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    return f"EPSG:{utm_epsg_for((w + e) / 2, (s + n) / 2)}"


def write_cog(out: Path, data: np.ndarray, crs, transform, nodata: float | None = None) -> Path:
    """A Cloud-Optimised GeoTIFF (header and overviews first, full-resolution blocks last, as COG readers expect)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype.name, crs=crs,
                   transform=transform, blocksize=64, compress="deflate", overview_resampling="average")
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def uint16_four_band(src_path: str | Path, out: Path) -> Path:
    """The scene as a 16-bit, 4-band raster (RGB scaled x 257 as a 16-bit sensor would store it, plus a NIR-like band)."""
    with rasterio.open(src_path) as src:
        rgb = src.read().astype(np.uint16) * 257
        crs, transform = src.crs, src.transform
    nir = (rgb.mean(axis=0, keepdims=True)).astype(np.uint16)
    return write_cog(out, np.concatenate([rgb, nir]), crs, transform)


def half_nodata(src_path: str | Path, out: Path) -> Path:
    """The scene with its western half set to nodata (0, declared)."""
    with rasterio.open(src_path) as src:
        data, crs, transform = src.read(), src.crs, src.transform
    data[:, :, : data.shape[2] // 2] = 0
    return write_cog(out, data, crs, transform, nodata=0)


def truncated(src_path: str | Path, out: Path, keep: float = 0.6) -> Path:
    """A COG cut to ``keep`` of its bytes: the header and overviews survive, the last full-resolution blocks do not."""
    full = write_cog(out.with_name(out.stem + "-full.tif"), rasterio.open(src_path).read(), *_georef(src_path))
    data = full.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    full.unlink()
    return out


def _georef(src_path: str | Path):
    with rasterio.open(src_path) as src:
        return src.crs, src.transform


def reference_from_osm(osm_path: str | Path, out: Path, with_class: bool = True) -> Path:
    """Reference polygons from the scene's real OSM polygons: the built ones (``building=*``) as ``urban_village``,
    the rest as ``other``. Real geometry, a made-up labelling: enough for the assessment to have something to check."""
    table = pq.read_table(osm_path)
    geoms = shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object))
    tags = [dict(t or []) for t in table["tags"].to_pylist()]
    keep = [i for i, g in enumerate(geoms) if g is not None and g.geom_type in ("Polygon", "MultiPolygon")]
    classes = ["urban_village" if "building" in tags[i] else "other" for i in keep]
    frame = {"class": classes} if with_class else {"kind": classes}
    gdf = gpd.GeoDataFrame(frame, geometry=list(geoms[keep]), crs=4326)
    gdf.to_parquet(out)
    return out
