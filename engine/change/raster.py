"""One city's change map: two class COGs (before, after) -> ``change.tif`` (codes of :mod:`engine.change.codes`).

**The rule, and why it tolerates misregistration.** The two dates' imagery is misregistered by a few pixels, so
their class maps are shifted copies of each other near every UV border; a plain pixel comparison would paint every
border as a thin ring of demolition on one side and new growth on the other. Here a pixel's code looks at the other
date within a disk of radius ``tolerance_px`` (pixels ``(dx, dy)`` with ``dx² + dy² <= tolerance_px²``):

- UV before, and after-UV within the disk: ``persistent_uv``; UV after, and before-UV within the disk:
  ``persistent_uv``. Border jitter is neither demolition nor growth: the village is still there, its outline only
  moved with the image. (So the persistent area is the *union* of both dates' UV, less true change: it exceeds
  either date's UV area by the jitter band. ``before_uv_m2`` and ``after_uv_m2`` give each date's own area.)
- UV before, no after-UV within the disk: ``demolished_uv`` (the after-UV mask dilated by the disk misses it).
- UV after, no before-UV within the disk: ``new_uv`` (symmetric).
- UV at neither date: ``other``. Either date nodata (or outside the after map): nodata (255).

A pure shift by ``v`` with ``|v| <= tolerance_px`` therefore gives no change at all (every before-UV pixel ``p`` has
the after-UV pixel ``p + v`` at distance ``|v|``). The tolerance is a Euclidean distance: a diagonal shift of
(3, 3) px is 4.24 px and needs ``tolerance_px=5``.

**Trade-off.** A true change thinner than the tolerance is missed: a village that grows by a band narrower than
``tolerance_px`` pixels along its edge, or a demolished strip narrower than ``2 * tolerance_px`` wedged between
surviving UV, counts as persistent; and where a village is demolished beside UV that stays (or beside a new one),
its first ``tolerance_px`` pixels next to that UV count as persistent. With 3 px at 1 m, changes under about 3 m across are not seen, far below the size of a
village, so the rule costs little real change and removes the border rings that would otherwise dominate the totals.

**Grids.** The change map is on the before map's grid (CRS, transform, size). The after map is read on that grid:
directly when the grids are equal, else through a :class:`rasterio.vrt.WarpedVRT` with nearest resampling (class
indices must not be averaged).

**Memory.** Both maps are read in full-width strips of ``block_rows`` rows plus a halo of ``tolerance_px`` rows above
and below (the dilation needs the neighbours of the strip's edge rows; the raster's own edges count as "not UV"), so
the result does not depend on the strip size; memory is about 12 bytes per pixel of one strip with its halo (380 MB
for 512 rows of a 60,000 px wide city; pass fewer rows for less) plus GDAL's block cache. An 8,000 px square city
takes about 3 s on one core (5 s warped), so a 60,000 px one about 3 minutes. Strips go into a
tiled temporary GTiff beside the output, which is then copied out as a COG (overviews: MODE), atomically
(:func:`engine.atomic.atomic_path`), like :mod:`engine.stitch.rasters`.

**Areas.** Every area is m² on the ground, equal-area (EPSG:6933), per raster row (the product's convention, and the
one ``class.tif``'s ``uv_share`` uses): one pixel's area per row comes from its projected corners
(:func:`engine.stitch.city._row_area_m2`). That works for a projected CRS (where it differs from the nominal pixel
area by the projection's scale error, under 0.1% in UTM) and for a geographic one (where pixels shrink towards the
poles), so a geographic CRS is accepted, not refused. ``pixel_area_m2`` is the nominal area (CRS units, metres) for
a projected CRS, NaN for a geographic one.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from scipy import ndimage

from engine.atomic import atomic_path
from engine.change.codes import (
    CHANGE_CLASSES,
    CHANGE_NODATA,
    DEMOLISHED_UV,
    NEW_UV,
    OTHER,
    PERSISTENT_UV,
    colormap,
)
from engine.product_layout import CHANGE_COG
from engine.stitch.city import _row_area_m2
from engine.stitch.rasters import COG_OPTIONS, RasterGrid

CHANGE_TIF = CHANGE_COG  # the products name it (engine.product_layout)
TMP_PREFIX = ".change-"
CLASS_NODATA = 255  # class.tif's nodata (engine.stitch.rasters.NODATA); used when a class map declares none


def disk(radius_px: int) -> np.ndarray:
    """Boolean structuring element: offsets ``(dy, dx)`` with ``dx² + dy² <= radius²``, centred.

    Example:
        >>> disk(1).astype(int).tolist()
        [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    """
    r = int(radius_px)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= r * r


def change_codes(before: np.ndarray, after: np.ndarray, uv_before: int, uv_after: int, tolerance_px: int,
                 nodata_before: int = CLASS_NODATA, nodata_after: int = CLASS_NODATA,
                 rows: slice = slice(None)) -> np.ndarray:
    """Change codes (uint8) of two class arrays on the same grid, by the rule of this module's docstring.

    Args:
        before, after: class indices, same shape (a strip with its halo rows).
        uv_before, uv_after: the UV class index in each map.
        tolerance_px: radius of the disk within which the other date's UV makes a pixel persistent (0: exact).
        nodata_before, nodata_after: each map's nodata value.
        rows: the rows of the result to return (the strip without its halo); the dilation sees all rows given.

    Example:
        >>> b = np.array([[0, 1, 1, 0, 0, 0]], np.uint8)
        >>> a = np.array([[0, 0, 1, 1, 0, 255]], np.uint8)  # shifted by one: no change; last pixel nodata
        >>> change_codes(b, a, 1, 1, 1).tolist()
        [[0, 1, 1, 1, 0, 255]]
        >>> change_codes(b, a, 1, 1, 0).tolist()  # without tolerance the shift is change
        [[0, 2, 1, 3, 0, 255]]
    """
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} arrays differ in shape")
    bu, au = before == uv_before, after == uv_after
    out = np.full(before.shape, OTHER, np.uint8)
    out[bu | au] = PERSISTENT_UV
    gone, came = bu & ~au, au & ~bu  # candidates; only they can be change
    if tolerance_px > 0:
        structure = disk(tolerance_px)
        if gone.any():
            gone &= ~ndimage.binary_dilation(au, structure=structure)
        if came.any():
            came &= ~ndimage.binary_dilation(bu, structure=structure)
    out[gone] = DEMOLISHED_UV
    out[came] = NEW_UV
    out[(before == nodata_before) | (after == nodata_after)] = CHANGE_NODATA
    return out[rows]


def same_grid(a: rasterio.io.DatasetReader, b: rasterio.io.DatasetReader) -> bool:
    """Whether two rasters share CRS, size and transform (to 1e-6 of a pixel)."""
    if (a.width, a.height) != (b.width, b.height) or a.crs != b.crs:
        return False
    pixel = max(abs(a.transform.a), abs(a.transform.e), 1e-300)
    return all(abs(x - y) <= 1e-6 * pixel for x, y in zip(a.transform[:6], b.transform[:6]))


def write_change_city(before_class: Path, after_class: Path, out_cog: Path, uv_index_before: int, uv_index_after: int,
                      tolerance_px: int = 3, block_rows: int = 512) -> dict:
    """Write one city's change COG (on the before map's grid) and return its pixel counts and areas.

    Args:
        before_class, after_class: the two runs' ``class.tif`` (uint8 class index, 255 nodata); any GDAL path.
        out_cog: the change COG to write (``change.tif``), replaced atomically.
        uv_index_before, uv_index_after: the UV class index in each run's ``classes`` (they may differ).
        tolerance_px: misregistration tolerance, a distance in pixels of the before grid (module docstring).
        block_rows: rows per strip (memory: about ``12 * (block_rows + 2 * tolerance_px) * width`` bytes).

    Returns:
        A flat dict: ``width_px``, ``height_px``, ``crs`` (text), ``warped`` (the after map was warped onto the
        before grid), ``tolerance_px``; ``pixel_area_m2`` (nominal, projected CRS; NaN if geographic);
        ``<code>_px`` and ``<code>_m2`` for each of :data:`~engine.change.codes.CHANGE_CLASSES` (pixels and
        equal-area m²), ``nodata_px``; ``before_uv_px``/``_m2`` and ``after_uv_px``/``_m2`` (each date's own UV on
        the pixels valid at both dates).
    """
    before_class, after_class, out_cog = Path(before_class), Path(after_class), Path(out_cog)
    for name, index in (("uv_index_before", uv_index_before), ("uv_index_after", uv_index_after)):
        if not 0 <= int(index) < CLASS_NODATA:
            raise ValueError(f"{name}={index}: a class index must be in [0, {CLASS_NODATA})")
    if int(tolerance_px) != tolerance_px or tolerance_px < 0:
        raise ValueError(f"tolerance_px={tolerance_px}: must be a whole number of pixels >= 0")
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows}: need at least 1")
    tolerance_px = int(tolerance_px)
    out_cog.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_cog.parent.glob(f"{TMP_PREFIX}{out_cog.stem}-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out_cog.stem}-", dir=out_cog.parent))
    try:
        with ExitStack() as stack:
            before = stack.enter_context(rasterio.open(before_class))
            after_src = stack.enter_context(rasterio.open(after_class))
            for label, ds, path in (("before", before, before_class), ("after", after_src, after_class)):
                if ds.crs is None:
                    raise ValueError(f"{label} class map {path}: no CRS; a class.tif from `stitch` always has one")
            grid = RasterGrid(before.width, before.height, before.transform, before.crs)
            nodata_b = _nodata(before)
            nodata_a = _nodata(after_src)
            warped = not same_grid(before, after_src)
            after = after_src
            if warped:  # nearest: class indices are labels, never averaged; outside the after map: nodata
                after = stack.enter_context(WarpedVRT(after_src, crs=before.crs, transform=before.transform, width=before.width,
                                                      height=before.height, resampling=Resampling.nearest,
                                                      src_nodata=nodata_a, nodata=nodata_a))
            tmp = tmp_dir / CHANGE_TIF
            profile = {"driver": "GTiff", "width": grid.width_px, "height": grid.height_px, "count": 1, "dtype": "uint8",
                       "crs": grid.crs, "transform": grid.transform, "nodata": CHANGE_NODATA, "tiled": True,
                       "blockxsize": 256, "blockysize": 256, "compress": "zstd", "zstd_level": 1, "bigtiff": "if_safer"}
            sums = _Sums(_row_area_m2(grid))
            with rasterio.open(tmp, "w", **profile) as out:
                out.write_colormap(1, colormap())
                out.set_band_description(1, "urban village change code")
                out.update_tags(1, classes=json.dumps(list(CHANGE_CLASSES)))
                out.update_tags(tolerance_px=str(tolerance_px))
                for row_off in range(0, grid.height_px, block_rows):
                    height = min(block_rows, grid.height_px - row_off)
                    top = max(0, row_off - tolerance_px)
                    bottom = min(grid.height_px, row_off + height + tolerance_px)
                    window = Window(0, top, grid.width_px, bottom - top)
                    b, a = before.read(1, window=window), after.read(1, window=window)
                    inner = slice(row_off - top, row_off - top + height)
                    codes = change_codes(b, a, uv_index_before, uv_index_after, tolerance_px, nodata_b, nodata_a, rows=inner)
                    out.write(codes, 1, window=Window(0, row_off, grid.width_px, height))
                    sums.add(row_off, codes, b[inner] == uv_index_before, a[inner] == uv_index_after)
        with atomic_path(out_cog) as cog:
            rasterio.shutil.copy(tmp, cog, driver="COG", OVERVIEW_RESAMPLING="MODE", **COG_OPTIONS)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"width_px": grid.width_px, "height_px": grid.height_px, "crs": grid.crs.to_string(), "warped": warped,
            "tolerance_px": tolerance_px, "pixel_area_m2": _nominal_pixel_area_m2(grid), **sums.result()}


class _Sums:
    """Pixel counts and equal-area m² per change code, and each date's UV on the pixels valid at both dates."""

    def __init__(self, row_area_m2: np.ndarray) -> None:
        self.row_area = row_area_m2
        self.px = np.zeros(256, np.int64)
        self.m2 = {name: 0.0 for name in (*CHANGE_CLASSES, "before_uv", "after_uv")}
        self.uv_px = {"before_uv": 0, "after_uv": 0}

    def add(self, row_off: int, codes: np.ndarray, before_uv: np.ndarray, after_uv: np.ndarray) -> None:
        areas = self.row_area[row_off:row_off + codes.shape[0]]
        self.px += np.bincount(codes.ravel(), minlength=256)
        for code, name in enumerate(CHANGE_CLASSES):
            self.m2[name] += float((codes == code).sum(axis=1) @ areas)
        valid = codes != CHANGE_NODATA
        for name, mask in (("before_uv", before_uv), ("after_uv", after_uv)):
            mask = mask & valid
            self.uv_px[name] += int(mask.sum())
            self.m2[name] += float(mask.sum(axis=1) @ areas)

    def result(self) -> dict:
        out: dict = {}
        for code, name in enumerate(CHANGE_CLASSES):
            out[f"{name}_px"] = int(self.px[code])
            out[f"{name}_m2"] = self.m2[name]
        out["nodata_px"] = int(self.px[CHANGE_NODATA])
        for name in ("before_uv", "after_uv"):
            out[f"{name}_px"] = self.uv_px[name]
            out[f"{name}_m2"] = self.m2[name]
        return out


def _nodata(ds: rasterio.io.DatasetReader) -> int:
    return CLASS_NODATA if ds.nodata is None else int(ds.nodata)


def _nominal_pixel_area_m2(grid: RasterGrid) -> float:
    """|det(transform)| in m² for a projected CRS (its linear unit converted to metres); NaN for a geographic one."""
    if not grid.crs.is_projected:
        return math.nan
    t = grid.transform
    factor = grid.crs.linear_units_factor[1] if grid.crs.linear_units_factor else 1.0
    return abs(t.a * t.e - t.b * t.d) * factor * factor
