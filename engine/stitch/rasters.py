"""The city's probability and class rasters: strips written into tiled GTiffs, then copied out as COGs.

Why two steps: GDAL's COG driver needs the whole image to build overviews, while the blend produces strips. Strips
go into a tiled temporary GTiff (windowed writes, memory = one strip); the COG driver then builds overviews and
writes the final file, atomically (``engine.atomic.atomic_path``), so readers never see half a COG.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from pyproj import CRS
from rasterio.windows import Window

from engine.atomic import atomic_path
from engine.product_layout import COGS, PROB_NODATA, PROB_SCALE

NODATA = PROB_NODATA  # the file names and the encoding live in engine.product_layout, shared with the readers
UV_PROB_TIF = COGS["uv_prob"]
CLASS_TIF = COGS["class"]
TMP_PREFIX = ".stitch-"
COG_OPTIONS = {"COMPRESS": "ZSTD", "LEVEL": "1", "BLOCKSIZE": "256", "NUM_THREADS": "ALL_CPUS"}  # ZSTD 1: 2.5x faster than DEFLATE 6, smaller


@dataclass(frozen=True)
class RasterGrid:
    """The city's pixel grid (the imagery's): size, transform and CRS."""

    width_px: int
    height_px: int
    transform: Affine
    crs: CRS


def quantise_prob(p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(p * 250)``, 255 where not ``valid``.

    Example:
        >>> quantise_prob(np.array([0.0, 0.5, 1.0]), np.array([True, True, False])).tolist()
        [0, 125, 255]
    """
    return np.where(valid, np.rint(np.clip(p, 0.0, 1.0) * PROB_SCALE), NODATA).astype(np.uint8)


class CityRasters:
    """Writes ``uv_prob.tif`` and ``class.tif`` of one city strip by strip; :meth:`finish` publishes the COGs.

    Use as a context manager: the temporary GTiffs live in a hidden folder beside the outputs and are removed on
    exit, success or not.
    """

    def __init__(self, out_dir: Path, grid: RasterGrid, classes: tuple[str, ...], uv_class: str) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f"{TMP_PREFIX}*"):  # left by a stitch that was killed
            shutil.rmtree(stale, ignore_errors=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
        profile = {"driver": "GTiff", "width": grid.width_px, "height": grid.height_px, "count": 1, "dtype": "uint8",
                   "crs": grid.crs, "transform": grid.transform, "nodata": NODATA, "tiled": True, "blockxsize": 256,
                   "blockysize": 256, "compress": "zstd", "zstd_level": 1, "bigtiff": "if_safer"}
        self._prob = rasterio.open(self._tmp / UV_PROB_TIF, "w", **profile)
        self._prob.scales = (1.0 / PROB_SCALE,)
        self._prob.set_band_description(1, f"p({uv_class})")
        self._class = rasterio.open(self._tmp / CLASS_TIF, "w", **profile)
        self._class.set_band_description(1, "class index")
        self._class.update_tags(1, classes=json.dumps(list(classes)))

    def write(self, row_off: int, prob_u8: np.ndarray, class_u8: np.ndarray) -> None:
        """Write one full-width strip of rows starting at ``row_off``."""
        window = Window(0, row_off, prob_u8.shape[1], prob_u8.shape[0])
        self._prob.write(prob_u8, 1, window=window)
        self._class.write(class_u8, 1, window=window)

    def finish(self) -> dict[str, Path]:
        """Close the temporary GTiffs and copy them out as COGs (overviews: average for p, mode for classes)."""
        self._close()
        out = {}
        for name, resampling in ((UV_PROB_TIF, "AVERAGE"), (CLASS_TIF, "MODE")):
            target = self.out_dir / name
            with atomic_path(target) as tmp:
                rasterio.shutil.copy(self._tmp / name, tmp, driver="COG", OVERVIEW_RESAMPLING=resampling, **COG_OPTIONS)
            out[name] = target
        return out

    def _close(self) -> None:
        for ds in (self._prob, self._class):
            if not ds.closed:
                ds.close()

    def __enter__(self) -> CityRasters:
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        shutil.rmtree(self._tmp, ignore_errors=True)
