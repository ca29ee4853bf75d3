"""What the model reads of a city's imagery: which bands, how pixel values become 8-bit, at what ground resolution.

A national team's imagery comes as 16-bit 4-band products, 8-bit RGB, BGR band orders, 0.3 m to 1.2 m sources.
The model takes 3 bands of 8-bit values at the ground resolution it was trained at. Rather than asking for a
converted copy of every city, the engine writes one small GDAL VRT per city (``imagery/<city>/model.vrt``) that
GDAL reads as the model input:

- **bands**: the source bands read as the model's R, G, B (``bands: 3,2,1``; default 1,2,3);
- **radiometry** (:class:`Radiometry`): ``uint8`` takes 8-bit values as they are; ``percentile:LO,HI`` stretches
  each band's LO-HI percentile range (computed from the overviews: a decimated read, never the full raster) onto
  1..255; ``range:MIN,MAX`` maps a fixed value range (a sensor's known scale); ``auto`` = ``uint8`` for 8-bit
  sources, ``percentile:2,98`` otherwise. Values are clamped at both ends by a VRT lookup table (``<LUT>``), and
  valid pixels never become 0 where 0 marks nodata;
- **ground resolution**: a source is resampled on read (``average`` when coarsening, ``bilinear`` when refining)
  when its ground GSD differs from a run's ``--gsd`` by more than :data:`GSD_TOLERANCE`; else, to the nearer end of
  the model's training GSD range when it lies beyond :data:`engine.imagery.GSD_WARN_RATIO` outside it (the
  ratio `map` has always warned at: a model trained on 0.5-1.2 m cities has seen every GSD inside the range and
  maps fine a little beyond it), or more than :data:`GSD_TOLERANCE` off a model trained at one GSD (an imported
  one). The VRT is the source's extent at the new pixel size, in the source's own CRS. In EPSG:3857 a pixel's ground size is its
  nominal size times cos(latitude); the scale factor is computed from the measured ground GSD
  (:func:`engine.imagery.ground_gsd_m`), so the result has the stated ground resolution in any CRS.

Nothing is resampled or rescaled silently: the city report and ``catalog validate`` say what was applied
(:meth:`InputPlan.describe`), and a VRT is written only when something must change (an 8-bit RGB GeoTIFF at the
model's GSD is read directly, as before). A source much coarser than the target (beyond
:data:`engine.imagery.GSD_REFUSE_RATIO`) is refused: upsampling a 10 m scene to 0.5 m invents no villages, it
only blurs.

Why a VRT and not a warped copy: GDAL applies band selection, scaling and resampling on each windowed read, so
no second copy of national imagery is written, every stage (grid, tiles, labels, stitching) reads the same
pixels through one path, and the file is a few KB that says exactly what was done.
"""

from __future__ import annotations

import math
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS

from engine import storage
from engine.atomic import write_if_changed
from engine.errors import describe_error
from engine.imagery import GSD_REFUSE_RATIO, GSD_WARN_RATIO, format_gsd, ground_gsd_m, probe_blocks
from engine.imagery_sources import ImagerySourceError, resolve_imagery

RADIOMETRY_METHODS = ("auto", "uint8", "percentile", "range")
DEFAULT_PERCENTILES = (2.0, 98.0)
GSD_TOLERANCE = 0.05  # sources within 5% of the target GSD are read as they are (no resampling blur for nothing)
STATS_MAX_PX = 1024  # percentiles from a decimated read at most this many pixels on the long side (overviews)
MODEL_BANDS = 3
VRT_NAME = "model.vrt"


class ModelInputError(ValueError):
    """The imagery cannot be made into the model's input as declared; the message names the file and why."""


@dataclass(frozen=True)
class Radiometry:
    """How source values become 8-bit model input (see the module docstring).

    Example:
        >>> Radiometry.parse("percentile:1,99"), str(Radiometry.parse("range:0,10000"))
        (Radiometry(method='percentile', low=1.0, high=99.0), 'range:0,10000')
        >>> Radiometry.parse("auto").resolve("uint16")
        Radiometry(method='percentile', low=2.0, high=98.0)
    """

    method: str = "auto"
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.method not in RADIOMETRY_METHODS:
            raise ValueError(f"radiometry {self.method!r}: use one of auto, uint8, percentile:LO,HI, range:MIN,MAX")
        if self.method in ("percentile", "range"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"radiometry {self.method}: needs LO < HI (got {self.low}, {self.high})")
            if self.method == "percentile" and not (0 <= self.low and self.high <= 100):
                raise ValueError(f"radiometry percentile:{self.low:g},{self.high:g}: percentiles lie in 0..100")

    @classmethod
    def parse(cls, text: str | None) -> Radiometry:
        """``auto`` | ``uint8`` | ``percentile:LO,HI`` (``percentile`` = 2,98) | ``range:MIN,MAX``; raises ValueError."""
        if text is None or not str(text).strip():
            return cls()
        method, _, args = str(text).strip().lower().partition(":")
        if method == "percentile" and not args:
            return cls("percentile", *DEFAULT_PERCENTILES)
        if method in ("percentile", "range"):
            try:
                low, high = (float(v) for v in args.split(","))
            except ValueError:
                raise ValueError(f"radiometry {text!r}: expected {method}:LO,HI with two numbers") from None
            return cls(method, low, high)
        if args:
            raise ValueError(f"radiometry {text!r}: {method} takes no arguments")
        return cls(method)

    def resolve(self, dtype: str) -> Radiometry:
        """``auto`` made concrete for a source pixel type: 8-bit as it is, anything else stretched."""
        if self.method != "auto":
            return self
        return Radiometry("uint8") if dtype == "uint8" else Radiometry("percentile", *DEFAULT_PERCENTILES)

    def __str__(self) -> str:
        if self.method in ("percentile", "range"):
            return f"{self.method}:{self.low:g},{self.high:g}"
        return self.method


@dataclass(frozen=True)
class InputSpec:
    """What a run asks of every city's imagery; a catalog row's ``bands``/``radiometry`` override it (:meth:`for_row`).

    Args:
        bands: 1-based source bands read as the model's R, G, B; None = 1, 2, 3.
        radiometry: how values become 8-bit.
        gsd_m: the ground GSD (metres) to resample every source to (one resolution for a whole product); None =
            see ``gsd_range_m``.
        gsd_range_m: the GSDs the model was trained at: a source inside it (or less than GSD_WARN_RATIO outside
            it) is read at its own GSD, one further outside is resampled to the nearer end (a 0.3 m source for a
            0.5-1.2 m model is read at 0.5 m); a one-GSD range resamples everything more than GSD_TOLERANCE off it.
            None (and no ``gsd_m``): every source at its own GSD.
        keep_8bit: 8-bit sources are read as they are whatever ``radiometry`` says (a model bundle's recorded
            stretch is for the kind of source it was trained on, not for a new 8-bit city).
        allow_gsd_mismatch: resample even a source more than GSD_REFUSE_RATIO coarser than ``gsd_m`` (refused
            otherwise: see the module docstring).
    """

    bands: tuple[int, ...] | None = None
    radiometry: Radiometry = Radiometry()
    gsd_m: float | None = None
    gsd_range_m: tuple[float, float] | None = None
    allow_gsd_mismatch: bool = False
    keep_8bit: bool = False

    def __post_init__(self) -> None:
        if self.bands is not None and (len(self.bands) != MODEL_BANDS or any(b < 1 for b in self.bands)):
            raise ValueError(f"bands {','.join(map(str, self.bands))}: give {MODEL_BANDS} band numbers from 1 (e.g. 3,2,1)")
        if self.gsd_m is not None and not (self.gsd_m > 0 and math.isfinite(self.gsd_m)):
            raise ValueError(f"gsd {self.gsd_m}: a positive number of metres")
        if self.gsd_range_m is not None and not (0 < self.gsd_range_m[0] <= self.gsd_range_m[1]):
            raise ValueError(f"gsd range {self.gsd_range_m}: need 0 < min <= max metres")

    def target_gsd(self, native_m: float) -> float | None:
        """The ground GSD a source of ``native_m`` is read at (None: as it is).

        Example:
            >>> spec = InputSpec(gsd_range_m=(0.5, 1.2))
            >>> spec.target_gsd(0.3), spec.target_gsd(0.4), spec.target_gsd(0.8), spec.target_gsd(2.0)
            (0.5, None, None, 1.2)
            >>> InputSpec(gsd_m=0.6).target_gsd(0.8), InputSpec(gsd_range_m=(0.5, 0.5)).target_gsd(0.6)
            (0.6, 0.5)
        """
        if self.gsd_m is not None:
            target, slack = self.gsd_m, 1.0 + GSD_TOLERANCE
        elif self.gsd_range_m is not None:
            lo, hi = self.gsd_range_m
            target = min(max(native_m, lo), hi)
            slack = GSD_WARN_RATIO if hi > lo * (1.0 + GSD_TOLERANCE) else 1.0 + GSD_TOLERANCE
        else:
            return None
        return None if max(native_m / target, target / native_m) <= slack else target

    def for_row(self, row: dict) -> InputSpec:
        """This spec with the row's own ``bands`` and ``radiometry`` (when set); raises ValueError naming the city."""
        city = row.get("city") or "?"
        try:
            bands = parse_bands(row["bands"]) if row.get("bands") else self.bands
            if row.get("radiometry"):  # the catalog's word for this city: applied as given, 8-bit sources too
                return replace(self, bands=bands, radiometry=Radiometry.parse(row["radiometry"]), keep_8bit=False)
            return replace(self, bands=bands)
        except ValueError as exc:
            raise ModelInputError(f"city {city}: {exc}") from None

    def to_json(self) -> dict:
        return {"bands": list(self.bands) if self.bands else None, "radiometry": str(self.radiometry), "gsd_m": self.gsd_m,
                "gsd_range_m": list(self.gsd_range_m) if self.gsd_range_m else None, "keep_8bit": self.keep_8bit}


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"3,2,1"`` -> ``(3, 2, 1)``; empty -> None. Raises ValueError for anything but 3 band numbers from 1.

    Example:
        >>> parse_bands("3, 2, 1"), parse_bands(None)
        ((3, 2, 1), None)
    """
    if text is None or not str(text).strip():
        return None
    try:
        bands = tuple(int(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"bands {text!r}: expected {MODEL_BANDS} comma-separated band numbers, e.g. 3,2,1") from None
    if len(bands) != MODEL_BANDS or any(b < 1 for b in bands):
        raise ValueError(f"bands {text!r}: expected {MODEL_BANDS} band numbers from 1, e.g. 3,2,1")
    return bands


@dataclass(frozen=True)
class InputPlan:
    """What the model VRT of one source does; :meth:`identity` when nothing must change.

    Attributes:
        source: the raster read (a GeoTIFF, or the VRT an imagery form resolved to).
        bands: source bands read as R, G, B.
        radiometry: the concrete method applied.
        value_ranges: per band, the ``(low, high)`` source values mapped onto the 8-bit range; None = as is.
        size: ``(width, height)`` after resampling; None = native.
        native_gsd_m, gsd_m: ground GSD of the source and of the model input.
    """

    source: str
    bands: tuple[int, ...]
    radiometry: Radiometry
    value_ranges: tuple[tuple[float, float], ...] | None
    size: tuple[int, int] | None
    native_gsd_m: float
    gsd_m: float

    @property
    def identity(self) -> bool:
        return self.bands == (1, 2, 3) and self.value_ranges is None and self.size is None

    def to_json(self) -> dict:
        """What a prepared city records of its model input (the tiles' marker; a bundle's training facts)."""
        return {"source": self.source, "bands": list(self.bands), "radiometry": str(self.radiometry),
                "value_ranges": [list(r) for r in self.value_ranges] if self.value_ranges else None,
                "native_gsd_m": round(self.native_gsd_m, 4), "gsd_m": round(self.gsd_m, 4), "applied": self.describe()}

    def describe(self) -> str:
        """``bands 3,2,1; percentile:2,98 (16-bit to 8-bit); resampled 0.30 m -> 0.50 m`` (empty when identity)."""
        parts = []
        if self.bands != (1, 2, 3):
            parts.append(f"bands {','.join(map(str, self.bands))}")
        if self.value_ranges is not None:
            spans = "; ".join(dict.fromkeys(f"{lo:g}-{hi:g}" for lo, hi in self.value_ranges))  # once when all bands agree
            parts.append(f"{self.radiometry} (values {spans} -> 8-bit)")
        if self.size is not None:
            parts.append(f"resampled {format_gsd(self.native_gsd_m)} -> {format_gsd(self.gsd_m)}")
        return "; ".join(parts)


def plan_input(src: rasterio.io.DatasetReader, path: str, spec: InputSpec) -> InputPlan:
    """Plan one source's model input: check the bands and pixel type against ``spec``, compute the stretch (a
    decimated read through the overviews) and the resampled size.

    Raises:
        ModelInputError: a band the source does not have, fewer than 3 bands, a pixel type that contradicts the
            declared radiometry (16-bit imagery declared ``uint8``), or a source too coarse for the target GSD.
    """
    bands = spec.bands or (1, 2, 3)
    if src.count < MODEL_BANDS and spec.bands is None:
        raise ModelInputError(f"imagery {path} has {src.count} band(s); the model reads {MODEL_BANDS} (R, G, B): give an RGB raster")
    missing = [b for b in bands if b > src.count]
    if missing:
        raise ModelInputError(f"imagery {path} has {src.count} band(s); bands {','.join(map(str, bands))} asks for band {missing[0]}")
    dtypes = {src.dtypes[b - 1] for b in bands}
    if len(dtypes) > 1:
        raise ModelInputError(f"imagery {path}: bands {','.join(map(str, bands))} mix pixel types {', '.join(sorted(dtypes))}")
    dtype = dtypes.pop()
    radiometry = Radiometry("uint8") if spec.keep_8bit and dtype == "uint8" else spec.radiometry.resolve(dtype)
    if radiometry.method == "uint8" and dtype != "uint8":
        raise ModelInputError(f"imagery {path} is {dtype} but its radiometry is declared uint8 (8-bit values taken as they are): "
                              f"use radiometry auto, percentile:2,98 or range:MIN,MAX")
    value_ranges = None
    if radiometry.method == "range":
        value_ranges = tuple((radiometry.low, radiometry.high) for _ in bands)
    elif radiometry.method == "percentile":
        value_ranges = _percentiles(src, path, bands, radiometry.low, radiometry.high)
    gx, gy = ground_gsd_m(src.transform, src.crs, src.width, src.height)
    native = math.sqrt(gx * gy)
    size, gsd = None, native
    target = spec.target_gsd(native)
    if target is not None:
        if native > target * GSD_REFUSE_RATIO and not spec.allow_gsd_mismatch:
            raise ModelInputError(f"imagery {path}: ground GSD {format_gsd(native)} is {native / target:.1f}x coarser than the "
                                  f"model's {format_gsd(target)} (limit {GSD_REFUSE_RATIO:g}x); resampling cannot add the "
                                  f"detail the model needs (--allow-gsd-mismatch reads it anyway)")
        f = target / native
        size = (max(1, round(src.width / f)), max(1, round(src.height / f)))
        gsd = target
    return InputPlan(source=path, bands=tuple(bands), radiometry=radiometry, value_ranges=value_ranges, size=size,
                     native_gsd_m=native, gsd_m=gsd)


def _percentiles(src, path: str, bands: tuple[int, ...], low: float, high: float) -> tuple[tuple[float, float], ...]:
    """Each band's (low, high) percentile over its valid pixels, from a read decimated to STATS_MAX_PX (GDAL serves
    it from the overviews when the file has them)."""
    scale = max(1.0, max(src.width, src.height) / STATS_MAX_PX)
    shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = src.read(list(bands), out_shape=(len(bands), *shape), masked=True)
    out = []
    for band, values in zip(bands, data):
        valid = values.compressed()
        valid = valid[np.isfinite(valid)] if valid.dtype.kind == "f" else valid
        if valid.size == 0:
            raise ModelInputError(f"imagery {path}: band {band} has no valid pixels to compute its {low:g}-{high:g} percentile stretch")
        lo, hi = (float(v) for v in np.percentile(valid, [low, high]))
        if not hi > lo:  # a flat band: map its one value to mid-grey rather than divide by zero
            lo, hi = lo - 1.0, hi + 1.0
        out.append((lo, hi))
    return tuple(out)


def write_input_vrt(plan: InputPlan, src: rasterio.io.DatasetReader, out: Path) -> Path:
    """Write the model VRT of ``plan`` to ``out`` (atomic; unchanged bytes are not rewritten, so a rerun keeps the
    file and its digest). The VRT keeps the source's CRS and extent; nodata and masks carry over."""
    width, height = plan.size or (src.width, src.height)
    # one scale factor for both axes keeps square pixels square (the grid requires it): the source then covers
    # (width * f, height * f) target pixels, up to half a pixel short of or past the rounded size on each axis
    f = plan.gsd_m / plan.native_gsd_m if plan.size else 1.0
    t = src.transform
    transform = (t.c, t.a * f, 0.0, t.f, 0.0, t.e * f)
    extent = (src.width / f, src.height / f)
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = CRS.from_user_input(src.crs).to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in transform)
    nodata = src.nodata
    has_mask = nodata is None and any(
        rasterio.enums.MaskFlags.all_valid not in flags for flags in (src.mask_flag_enums[b - 1] for b in plan.bands))
    floor = 1 if (nodata is not None or has_mask) else 0  # valid pixels stay >= 1 where 0 means nodata
    resampling = "average" if plan.size and plan.gsd_m > plan.native_gsd_m else "bilinear"
    source = storage.gdal_path(plan.source)  # s3:// sources as /vsis3/, a remote workspace's files by their objects
    for i, band in enumerate(plan.bands, start=1):
        vband = ET.SubElement(root, "VRTRasterBand", dataType="Byte", band=str(i))
        if nodata is not None:
            ET.SubElement(vband, "NoDataValue").text = "0"
        ET.SubElement(vband, "ColorInterp").text = ("Red", "Green", "Blue")[i - 1]
        attrs = {"resampling": resampling} if plan.size else {}
        el = ET.SubElement(vband, "ComplexSource", **attrs)
        _source_rect(el, source, str(band), src, extent)
        if nodata is not None:
            ET.SubElement(el, "NODATA").text = repr(float(nodata))
        if plan.value_ranges is not None:
            lo, hi = plan.value_ranges[i - 1]
            ET.SubElement(el, "LUT").text = f"{lo!r}:{floor},{hi!r}:255"
        elif floor:
            ET.SubElement(el, "LUT").text = f"0:{floor},{floor}:{floor},255:255"  # 8-bit as is; a valid 0 reads as 1
    if has_mask:
        mask = ET.SubElement(ET.SubElement(root, "MaskBand"), "VRTRasterBand", dataType="Byte")
        el = ET.SubElement(mask, "SimpleSource", resampling="nearest") if plan.size else ET.SubElement(mask, "SimpleSource")
        _source_rect(el, source, f"mask,{plan.bands[0]}", src, extent)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode") + "\n"
    return write_if_changed(out, text)


def _source_rect(el: ET.Element, source: str, band: str, src, extent: tuple[float, float]) -> None:
    """The whole source onto ``extent`` target pixels (fractional: GDAL resamples onto the exact footprint)."""
    ET.SubElement(el, "SourceFilename", relativeToVRT="0").text = source
    ET.SubElement(el, "SourceBand").text = band
    ET.SubElement(el, "SrcRect", xOff="0", yOff="0", xSize=str(src.width), ySize=str(src.height))
    ET.SubElement(el, "DstRect", xOff="0", yOff="0", xSize=f"{extent[0]:.10g}", ySize=f"{extent[1]:.10g}")


def model_imagery(path: str, spec: InputSpec, out_dir: Path) -> tuple[str, InputPlan]:
    """The path the model reads for ``path`` under ``spec``: ``path`` itself when nothing must change, else the
    model VRT written into ``out_dir``; and the plan (what was applied)."""
    with warnings.catch_warnings(), rasterio.open(path) as src:
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        if src.crs is None:
            raise ModelInputError(f"imagery {path} has no CRS; write one (e.g. gdal_edit.py -a_srs EPSG:32650)")
        try:  # a damaged source is named here: past this point every read goes through the VRT's name
            probe_blocks(src)
        except Exception as exc:  # noqa: BLE001 (GDAL raises its own error classes too)
            raise ModelInputError(f"imagery {path} is damaged (truncated or corrupt): {describe_error(exc)}") from None
        plan = plan_input(src, path, spec)
        if plan.identity:
            return path, plan
        return str(write_input_vrt(plan, src, Path(out_dir) / VRT_NAME)), plan


# --- a catalog's cities -----------------------------------------------------------------------------------------
RESOLVED_FIELDS = ("zoom", "asset", "bands", "radiometry")  # cleared once applied: a resolved row resolves to itself


def resolve_city_imagery(row: dict, spec: InputSpec, out_dir: Path) -> tuple[dict, InputPlan]:
    """``row`` with ``imagery`` = what the model reads: the imagery form resolved to one raster
    (:func:`engine.imagery_sources.resolve_imagery`: a tile folder's mosaic, an MBTiles zoom, an XYZ cache, a STAC
    asset), then its model input (:func:`model_imagery`: bands, radiometry, GSD). The row's ``zoom``, ``asset``,
    ``bands`` and ``radiometry`` are cleared, so resolving the result again changes nothing.

    Raises:
        ModelInputError / ImagerySourceError: one line naming the city, the file and what is wrong.
    """
    city = row.get("city") or "?"
    try:
        source = resolve_imagery(row["imagery"], zoom=row.get("zoom"), asset=row.get("asset"), out_dir=out_dir)
        path, plan = model_imagery(source, spec.for_row(row), out_dir)
    except (ModelInputError, ImagerySourceError) as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(f"city {city}") else f"city {city}: {message}") from None
    if path != row["imagery"] and (uri := storage.uri_of(path)):
        # a remote workspace: every node reads the VRTs from the bucket (by URI; their sources are named there too)
        storage.publish(Path(out_dir))
        path = uri
    return {**row, "imagery": path, **dict.fromkeys(RESOLVED_FIELDS)}, plan


def resolve_catalog(catalog, imagery_dir, spec: InputSpec) -> tuple[object, dict[str, InputPlan], dict[str, str]]:
    """Every city of ``catalog`` (a pyarrow table) resolved by :func:`resolve_city_imagery` into
    ``imagery_dir(city)``: ``(catalog with resolved imagery, plan by city, error line by city)``. A city that
    fails keeps its row as it was (the caller fails it by its error); the others go on."""
    import pyarrow as pa

    from engine.errors import describe_error

    rows, plans, errors = [], {}, {}
    with storage.raster_env():
        for row in catalog.to_pylist():
            city = row.get("city") or "?"
            try:
                resolved, plans[city] = resolve_city_imagery(row, spec, imagery_dir(city))
                rows.append(resolved)
            except ValueError as exc:
                errors[city] = str(exc)
                rows.append(row)
            except Exception as exc:  # noqa: BLE001 (GDAL's own errors: one city's line, never the run)
                errors[city] = f"city {city}: {describe_error(exc)} [imagery {row.get('imagery')}]"
                rows.append(row)
    return pa.Table.from_pylist(rows, schema=catalog.schema), plans, errors
