"""Facts about a city's imagery that decide whether the model can take it: pixel type, bands, ground resolution,
and whether its blocks can be read at all.

Why a module of its own: `catalog validate`, `prepare` and `map` must give the same answer for the same file, in
the same words. The model takes 8-bit RGB at the ground resolution it was trained at; anything else is refused (or
warned about) by name here, never rescaled silently (16-bit imagery divided by 255 maps to probability 0
everywhere; a 10 m scene given to a 0.5 m model maps confident nonsense).

Ground sampling distance (GSD) is measured on the ground, in metres, whatever the CRS: the centre pixel's corners
are taken to longitude/latitude and its sides measured on the WGS84 ellipsoid (``pyproj.Geod``). So a degree-based
EPSG:4326 raster and a Web Mercator one (whose metres stretch by 1/cos(latitude)) report what they really resolve.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import rasterio
from pyproj import CRS, Geod, Transformer
from rasterio.windows import Window

from engine.errors import describe_error

MODEL_DTYPE = "uint8"  # what the model's input normalisation assumes (pixels / 255)
MODEL_MIN_BANDS = 3  # bands 1-3 are read as RGB
GSD_WARN_RATIO = 1.5  # `map` warns beyond this ratio to the model's training GSD ...
GSD_REFUSE_RATIO = 3.0  # ... and refuses beyond this one (unless --allow-gsd-mismatch)

_GEOD = Geod(ellps="WGS84")


@dataclass(frozen=True)
class ImageryFacts:
    """What the header of one raster says (no pixels read)."""

    path: str
    crs: str
    width_px: int
    height_px: int
    bands: int
    dtype: str
    gsd_x_m: float  # ground width of the centre pixel (metres, on the ellipsoid)
    gsd_y_m: float  # ground height of the centre pixel

    @property
    def gsd_m(self) -> float:
        """One number for the ground resolution: the geometric mean of the pixel's ground sides (metres)."""
        return math.sqrt(self.gsd_x_m * self.gsd_y_m)

    def summary(self) -> str:
        """``EPSG:4326, 335 x 423 px, 3 x uint8, ground GSD 0.59 m``."""
        return f"{self.crs}, {self.width_px} x {self.height_px} px, {self.bands} x {self.dtype}, ground GSD {format_gsd(self.gsd_m)}"


def format_gsd(gsd_m: float) -> str:
    """``0.59 m`` / ``10.2 m`` / ``12 m``: two significant digits at least, never scientific notation."""
    return f"{gsd_m:.2f} m" if gsd_m < 10 else f"{gsd_m:.1f} m" if gsd_m < 100 else f"{gsd_m:.0f} m"


def ground_gsd_m(transform, crs: CRS | str, width_px: int, height_px: int) -> tuple[float, float]:
    """Ground width and height (metres) of the raster's centre pixel, measured on the WGS84 ellipsoid.

    Example:
        >>> from rasterio.transform import from_origin
        >>> x, y = ground_gsd_m(from_origin(500000, 3000000, 0.5, 0.5), "EPSG:32650", 100, 100)
        >>> round(x, 2), round(y, 2)  # UTM metres are ground metres within the zone's scale factor
        (0.5, 0.5)
        >>> x, y = ground_gsd_m(from_origin(116.0, 40.0, 1e-5, 1e-5), "EPSG:4326", 100, 100)
        >>> round(x, 3), round(y, 3)  # a degree of longitude shrinks with cos(latitude)
        (0.854, 1.11)
    """
    col, row = width_px // 2, height_px // 2
    xs, ys = transform @ (np.array([col, col + 1, col], float), np.array([row, row, row + 1], float))
    lon, lat = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True).transform(xs, ys)
    _, _, dx = _GEOD.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, dy = _GEOD.inv(lon[0], lat[0], lon[2], lat[2])
    return float(abs(dx)), float(abs(dy))


def imagery_facts(src: rasterio.io.DatasetReader, path: str) -> ImageryFacts:
    """The facts of an open raster (it must have a CRS)."""
    gx, gy = ground_gsd_m(src.transform, src.crs, src.width, src.height)
    return ImageryFacts(path=path, crs=CRS.from_user_input(src.crs).to_string(), width_px=src.width, height_px=src.height,
                        bands=src.count, dtype=src.dtypes[0], gsd_x_m=gx, gsd_y_m=gy)


def read_imagery_facts(path: str) -> ImageryFacts:
    """Open ``path`` (header only) and return its facts; raises rasterio's error when it cannot be opened."""
    with warnings.catch_warnings(), rasterio.open(path) as src:
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        if src.crs is None:
            raise ValueError(f"{path}: raster has no CRS; assign one (gdal_edit.py -a_srs EPSG:xxxx)")
        return imagery_facts(src, path)


def model_input_problem(facts: ImageryFacts) -> str | None:
    """Why the model cannot take this imagery as it is (None when it can): it needs 3+ bands of uint8.

    Never a rescale: the right stretch of 16-bit or float imagery depends on the sensor, so it is the user's call
    (until the bundle carries its own radiometry).
    """
    if facts.dtype == MODEL_DTYPE and facts.bands >= MODEL_MIN_BANDS:
        return None
    fix = ("convert it first, e.g. `gdal_translate -ot Byte -scale <min> <max> 0 255 -b 1 -b 2 -b 3` (it is never rescaled "
           "silently)" if facts.dtype != MODEL_DTYPE else "give an RGB raster")
    return (f"imagery {facts.path} has {facts.bands} band(s) of {facts.dtype}; the model takes {MODEL_MIN_BANDS}+ bands of "
            f"{MODEL_DTYPE} (8-bit RGB): {fix}")


def gsd_ratio(gsd_m: float, trained_m: tuple[float, float]) -> float:
    """How far ``gsd_m`` lies outside the training GSD range ``(lo, hi)``: 1 inside it, else the ratio to the nearer end.

    Example:
        >>> gsd_ratio(0.8, (0.5, 1.2)), gsd_ratio(3.6, (0.5, 1.2)), round(gsd_ratio(0.25, (0.5, 1.2)), 2)
        (1.0, 3.0, 2.0)
    """
    lo, hi = trained_m
    if gsd_m > hi:
        return gsd_m / hi
    if gsd_m < lo:
        return lo / gsd_m
    return 1.0


def probe_blocks(src: rasterio.io.DatasetReader) -> None:
    """Read the smallest overview and the first and last block of every band: cheap, and it catches a truncated
    file (whose header is intact but whose last blocks are gone) before any stage relies on it.

    Raises:
        rasterio.errors.RasterioIOError (or GDAL's own error) from the read that failed.
    """
    for band, (block_h, block_w) in zip(src.indexes, src.block_shapes):
        last_col = ((src.width - 1) // block_w) * block_w
        last_row = ((src.height - 1) // block_h) * block_h
        src.read(band, window=Window(0, 0, min(block_w, src.width), min(block_h, src.height)))
        src.read(band, window=Window(last_col, last_row, src.width - last_col, src.height - last_row))
    factors = src.overviews(1)
    if factors:
        f = factors[-1]
        src.read(out_shape=(src.count, max(1, math.ceil(src.height / f)), max(1, math.ceil(src.width / f))))


def inspect_imagery(src: rasterio.io.DatasetReader, path: str) -> tuple[ImageryFacts, str | None, str | None]:
    """What `catalog validate` and `map` both need of an open raster (it must have a CRS): its facts, why the model
    cannot take it (:func:`model_input_problem`, or None) and why it is damaged (a failed :func:`probe_blocks`,
    with GDAL's cause, or None)."""
    facts = imagery_facts(src, path)
    try:
        probe_blocks(src)
        damage = None
    except Exception as exc:  # noqa: BLE001 (GDAL raises its own error classes too)
        damage = f"{path} is damaged (truncated or corrupt): {describe_error(exc)}"
    return facts, model_input_problem(facts), damage
