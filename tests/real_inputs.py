"""Real inputs in the forms users hold them, made from the real GeoLink example scenes (data nobody here made).

Each function takes a scene converted by :func:`engine.scenes.scene_to_city` (an EPSG:4326 GeoTIFF and its OSM)
and writes one variant: the same pixels warped to another CRS, stored as 16-bit with a fourth band, half nodata,
a truncated file. Seeded and small (a few hundred KB in all), so tests can build them in ``tmp_path``.
"""

from __future__ import annotations

import warnings
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


# --- the same scene in the forms tile caches and tile folders hold it (engine.imagery_sources) -------------------
WEB_MERCATOR_HALF_M = 20037508.342789244  # half the side of the EPSG:3857 world square


def split_tiles(src_path: str | Path, out_dir: Path, rows: int = 2, cols: int = 2) -> list[Path]:
    """The raster cut into ``rows`` x ``cols`` GeoTIFF tiles of unequal sizes (as a provider delivers a mosaic)."""
    from rasterio.windows import Window

    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    with rasterio.open(src_path) as src:
        row_cuts = [0, *(round(src.height * (i + 0.1) / rows) for i in range(1, rows)), src.height]
        col_cuts = [0, *(round(src.width * (j - 0.1) / cols) for j in range(1, cols)), src.width]
        for i in range(rows):
            for j in range(cols):
                win = Window(col_cuts[j], row_cuts[i], col_cuts[j + 1] - col_cuts[j], row_cuts[i + 1] - row_cuts[i])
                path = out_dir / f"tile_r{i}_c{j}.tif"
                profile = src.profile | dict(width=int(win.width), height=int(win.height), transform=src.window_transform(win),
                                             blockxsize=64, blockysize=64)
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(src.read(window=win))
                out.append(path)
    return out


def web_mercator_tiles(src_path: str | Path, zoom: int) -> tuple[np.ndarray, object, int, int]:
    """The raster warped onto the XYZ tile grid of ``zoom`` (bilinear), as RGBA whose alpha marks the scene's
    footprint: ``(rgba, transform, x0, y0)`` with ``(x0, y0)`` the top-left tile's index."""
    import math

    from rasterio.transform import from_origin
    from rasterio.warp import transform_bounds

    span = 2 * WEB_MERCATOR_HALF_M / 2**zoom
    with rasterio.open(src_path) as src:
        left, bottom, right, top = transform_bounds(src.crs, "EPSG:3857", *src.bounds)
        x0, x1 = math.floor((left + WEB_MERCATOR_HALF_M) / span), math.floor((right + WEB_MERCATOR_HALF_M) / span)
        y0, y1 = math.floor((WEB_MERCATOR_HALF_M - top) / span), math.floor((WEB_MERCATOR_HALF_M - bottom) / span)
        transform = from_origin(-WEB_MERCATOR_HALF_M + x0 * span, WEB_MERCATOR_HALF_M - y0 * span, span / 256, span / 256)
        rgba = np.zeros((4, (y1 - y0 + 1) * 256, (x1 - x0 + 1) * 256), np.uint8)
        for band in range(3):
            reproject(src.read(band + 1), rgba[band], src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                      dst_crs="EPSG:3857", resampling=Resampling.bilinear)
        reproject(np.full((src.height, src.width), 255, np.uint8), rgba[3], src_transform=src.transform, src_crs=src.crs,
                  dst_transform=transform, dst_crs="EPSG:3857", resampling=Resampling.nearest)
    rgba[:3, rgba[3] == 0] = 0
    return rgba, transform, x0, y0


def xyz_folder(src_path: str | Path, out_dir: Path, zoom: int, suffix: str = ".png") -> Path:
    """An ``{z}/{x}/{y}.png`` (or ``.jpg``, RGB) folder of 256 px tiles of the raster at ``zoom``; tiles that hold no
    pixel of the scene are not written (as tile caches skip empty tiles)."""
    rgba, _, x0, y0 = web_mercator_tiles(src_path, zoom)
    driver, bands = ("PNG", 4) if suffix == ".png" else ("JPEG", 3)
    for j in range(rgba.shape[1] // 256):
        for i in range(rgba.shape[2] // 256):
            tile = rgba[:bands, j * 256:(j + 1) * 256, i * 256:(i + 1) * 256]
            if not rgba[3, j * 256:(j + 1) * 256, i * 256:(i + 1) * 256].any():
                continue
            path = out_dir / str(zoom) / str(x0 + i) / f"{y0 + j}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # tile images carry no georeference
                with rasterio.open(path, "w", driver=driver, width=256, height=256, count=bands, dtype="uint8") as dst:
                    dst.write(tile)
    return out_dir


def web_mercator_geotiff(src_path: str | Path, out: Path, zoom: int) -> Path:
    """The raster on the ``zoom`` tile grid as an RGBA GeoTIFF (alpha: the scene's footprint)."""
    rgba, transform, _, _ = web_mercator_tiles(src_path, zoom)
    with rasterio.open(out, "w", driver="GTiff", width=rgba.shape[2], height=rgba.shape[1], count=4, dtype="uint8", crs="EPSG:3857",
                       transform=transform, photometric="RGB", alpha="YES", tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(rgba)
    return out


def mbtiles(src_path: str | Path, out: Path, zoom: int, lower_zooms: int = 1) -> Path:
    """An MBTiles file (PNG tiles) of the raster at ``zoom``, plus ``lower_zooms`` coarser zoom levels (GDAL's
    overviews of an MBTiles file are its lower zooms)."""
    import rasterio.shutil
    from rasterio.enums import Resampling as R

    tif = web_mercator_geotiff(src_path, out.with_suffix(".3857.tif"), zoom)
    rasterio.shutil.copy(tif, out, driver="MBTiles", TILE_FORMAT="PNG")
    if lower_zooms:
        with rasterio.open(out, "r+") as dst:
            dst.build_overviews([2**k for k in range(1, lower_zooms + 1)], R.average)
    tif.unlink()
    return out
