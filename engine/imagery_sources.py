"""A city's imagery in the forms people hold it, resolved to one raster path that GDAL opens as a single north-up
raster at the source's native resolution, bands and pixel type.

Forms (:func:`imagery_form`, from the catalog's ``imagery`` cell, with ``zoom`` and ``asset`` where they apply):

- ``geotiff``: a GeoTIFF or COG (or any single raster file GDAL opens as is): returned unchanged;
- ``vrt``: a GDAL VRT: returned unchanged once each local source file it names is known to exist (GDAL opens
  VRT sources lazily, so a missing one would otherwise surface only as a failed read deep in a stage);
- ``tiles``: a folder (``tiles/``) or glob (``tiles/*.tif``) of GeoTIFF tiles: a mosaic VRT written as
  gdalbuildvrt would (one ``SimpleSource`` per tile on the union grid). The tiles must share CRS, resolution,
  band count, pixel type and one pixel grid; anything else is an error naming two tiles and what differs, never
  a warped mosaic, so no pixel is resampled silently;
- ``mbtiles``: an MBTiles file (``zoom``: default its deepest zoom), read by GDAL's MBTiles driver through a VRT
  whose sources carry the ``ZOOM_LEVEL`` open option;
- ``xyz``: a ``{z}/{x}/{y}.png|jpg|webp`` tile folder (XYZ order: y counted from the top, as OSM and most tile
  caches), read by GDAL's WMS driver (TMS minidriver over ``file://`` URLs; no cache); the data window is the
  range of tiles present, so the city raster is only the covered area;
- ``stac``: a STAC Item JSON (``asset``: default the first of ``visual``, ``image``, ``data``, else its only
  GeoTIFF asset): the asset's href (relative hrefs against the item's folder), then resolved as above.

Tile caches (MBTiles, XYZ) keep their RGB bands and turn the alpha band into the VRT's mask, so transparent or
missing tiles are nodata: the tile grid (:mod:`engine.tiles.grid`) keeps only tiles whose cores hold valid mask
pixels. They are EPSG:3857, where a pixel's ground size shrinks with cos(latitude); nothing here assumes metres
per pixel (:func:`engine.imagery.ground_gsd_m` measures the ground GSD).

Resolving reads headers only (tile headers, SQLite metadata, the item JSON), never pixels, so ``catalog validate``
stays fast. What it writes (``source.vrt``, and ``source-wms.xml`` for XYZ) goes into ``out_dir`` atomically, and
only when the content changes, so a rerun leaves the same bytes and the same modification time.
"""

from __future__ import annotations

import glob
import json
import math
import os
import posixpath
import re
import sqlite3
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import rasterio
from rasterio.crs import CRS
from rasterio.dtypes import dtype_rev, typename_fwd

from engine import storage
from engine.atomic import write_if_changed

FORMS = ("geotiff", "vrt", "tiles", "mbtiles", "xyz", "stac")
VRT_NAME = "source.vrt"  # the raster to open, for every form that needs one (stable: a rerun rewrites the same file)
WMS_NAME = "source-wms.xml"  # the XYZ form's GDAL_WMS description, read by source.vrt
MAX_ZOOM = 24
TILE_SUFFIXES = (".tif", ".tiff")
XYZ_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
STAC_DEFAULT_ASSETS = ("visual", "image", "data")
RES_RTOL = 1e-9  # tiles of one mosaic must share the pixel size within this relative tolerance
GRID_TOL_PX = 1e-3  # ... and lie on one pixel grid within this fraction of a pixel
WEB_MERCATOR_HALF_M = 20037508.342789244  # half the side of the EPSG:3857 world square: pi * 6378137
_GLOB_CHARS = re.compile(r"[*?\[]")
_DRIVER_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]+:(?![\\/])")  # "NETCDF:a.nc:v", not "C:\\" nor "/a:b"


class ImagerySourceError(ValueError):
    """The imagery cannot be resolved to one raster; the message is one line naming the file and what is wrong."""


def imagery_form(imagery: str) -> str:
    """Which form a catalog ``imagery`` cell is: ``geotiff``, ``vrt``, ``tiles``, ``mbtiles``, ``xyz`` or ``stac``.

    Decided from the path (its suffix, glob characters, a ``{z}`` template); a folder is ``xyz`` when it holds
    ``<zoom>/<x>/`` number folders, else ``tiles``. Anything else is ``geotiff`` (any raster GDAL opens as is).

    Example:
        >>> [imagery_form(p) for p in ("a.tif", "a.vrt", "t/*.tif", "c.mbtiles", "x/{z}/{x}/{y}.png", "item.json")]
        ['geotiff', 'vrt', 'tiles', 'mbtiles', 'xyz', 'stac']
    """
    text = str(imagery).strip()
    lower = text.lower().rstrip("/")
    if "{z}" in text:
        return "xyz"
    if lower.endswith(".json"):
        return "stac"
    if lower.endswith(".mbtiles"):
        return "mbtiles"
    if lower.endswith(".vrt"):
        return "vrt"
    if _is_remote(text) or os.path.isfile(text):  # an existing file is itself, even named like a glob (scene[1].tif)
        return "geotiff"
    if _GLOB_CHARS.search(text):
        return "tiles"
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        return "xyz" if os.path.isdir(text) and _xyz_zoom_dirs(Path(text)) else "tiles"
    return "geotiff"


def parse_zoom(zoom: int | str | None, source: str) -> int | None:
    """``zoom`` as an integer 0-24 (None when not given); else :class:`ImagerySourceError` naming ``source``.

    Example:
        >>> parse_zoom("18", "city.mbtiles"), parse_zoom(None, "city.mbtiles")
        (18, None)
    """
    if zoom is None or (isinstance(zoom, str) and not zoom.strip()):
        return None
    try:
        value = float(str(zoom).strip())
    except ValueError:
        value = math.nan
    if not value.is_integer() or not 0 <= value <= MAX_ZOOM:
        raise ImagerySourceError(f"{source}: zoom {zoom!r} is not an integer 0-{MAX_ZOOM}")
    return int(value)


def resolve_imagery(imagery: str, *, zoom: int | str | None = None, asset: str | None = None, out_dir: Path) -> str:
    """The path to open for a catalog ``imagery`` cell: the file itself (GeoTIFF, COG, VRT) or a VRT written into
    ``out_dir`` (``source.vrt``; a tile folder, an MBTiles zoom, an XYZ cache); a STAC item resolves to its asset.

    Reads headers only. Writes nothing for a GeoTIFF or VRT; otherwise rewrites ``out_dir``'s files only when their
    content changes (the same input gives the same bytes).

    Raises:
        ImagerySourceError: one line naming the file and what is wrong (missing file or VRT source, tiles that
            differ, a zoom the file cannot serve, an asset the item does not have, a folder without GeoTIFFs).

    Example:
        >>> import tempfile, numpy as np
        >>> from rasterio.transform import from_origin
        >>> d = Path(tempfile.mkdtemp())
        >>> for i in range(2):
        ...     with rasterio.open(d / f"t{i}.tif", "w", driver="GTiff", width=4, height=4, count=3, dtype="uint8",
        ...                        crs="EPSG:32650", transform=from_origin(500000 + 4 * i, 3000000, 1, 1)) as t:
        ...         t.write(np.full((3, 4, 4), i + 1, "uint8"))
        >>> path = resolve_imagery(str(d), out_dir=d / "out")
        >>> Path(path).name, rasterio.open(path).shape
        ('source.vrt', (4, 8))
    """
    imagery = str(imagery).strip()
    form = imagery_form(imagery)
    z = parse_zoom(zoom, imagery)
    if form == "stac":
        return _resolve_stac(imagery, z, asset, Path(out_dir))
    if _is_remote(imagery):
        if form in ("geotiff", "vrt"):
            return imagery  # read in place by GDAL (range requests)
        raise ImagerySourceError(f"{imagery}: a remote {form} source is not supported; copy it to a local disk or convert it to a COG")
    if form == "geotiff":
        if not Path(imagery).is_file():
            raise ImagerySourceError(f"file not found: {imagery}")
        return imagery
    if form == "vrt":
        if not Path(imagery).is_file():
            raise ImagerySourceError(f"file not found: {imagery}")
        check_vrt_sources(imagery)
        return imagery
    out = Path(out_dir) / VRT_NAME
    if form == "tiles":
        text = mosaic_vrt(tile_files(imagery), imagery)
    elif form == "mbtiles":
        text = mbtiles_vrt(imagery, z)
    else:
        folder, suffix = _xyz_folder(imagery)
        wms, text = xyz_vrt(folder, z, suffix, Path(out_dir) / WMS_NAME)
        write_if_changed(Path(out_dir) / WMS_NAME, wms)
    return str(write_if_changed(out, text))


# --- VRTs: their sources, and writing them ---------------------------------------------------------------------
def vrt_sources(path: str | os.PathLike[str]) -> list[str]:
    """The files a VRT names (``SourceFilename``; ``relativeToVRT="1"`` ones resolved against its folder), once
    each, in order."""
    root = ET.parse(path).getroot()
    out: list[str] = []
    for el in root.iter("SourceFilename"):
        name = (el.text or "").strip()
        if name and el.get("relativeToVRT") == "1":
            name = os.path.normpath(Path(path).parent / name)
        if name and name not in out:
            out.append(name)
    return out


def check_vrt_sources(path: str | os.PathLike[str], _seen: frozenset[str] = frozenset()) -> None:
    """Raise :class:`ImagerySourceError` naming the first local source file of the VRT (or of a VRT it reads) that
    does not exist. URLs, ``/vsi`` paths, inline XML and driver-prefixed names (``NETCDF:...``) are left to GDAL."""
    try:
        sources = vrt_sources(path)
    except (ET.ParseError, OSError) as exc:
        raise ImagerySourceError(f"{path}: not a readable VRT ({exc})") from None
    for name in sources:
        if _is_remote(name) or name.startswith("<") or _DRIVER_PREFIX.match(name):
            continue
        if not os.path.exists(name):
            raise ImagerySourceError(f"{path}: VRT source file not found: {name}")
        if name.lower().endswith(".vrt") and name not in _seen:
            check_vrt_sources(name, _seen | {str(path)})


def _vrt_root(width: int, height: int, crs: CRS, transform) -> ET.Element:
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = crs.to_wkt()  # no axis mapping given: GDAL reads it in GIS order (x = lon/east)
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in transform.to_gdal())
    return root


def _vrt_band(parent: ET.Element, tag: str, dtype: str, band: int | None, block: tuple[int, int] | None) -> ET.Element:
    attrs = {"dataType": typename_fwd[dtype_rev[dtype]]}
    if band is not None:
        attrs["band"] = str(band)
    if block is not None:
        attrs.update(blockXSize=str(block[1]), blockYSize=str(block[0]))
    return ET.SubElement(parent, tag, **attrs)


def _simple_source(band: ET.Element, filename: str, source_band: int | str, src_rect: tuple[int, int, int, int],
                   dst_rect: tuple[int, int, int, int], props: dict | None = None, open_options: dict | None = None) -> None:
    source = ET.SubElement(band, "SimpleSource")
    ET.SubElement(source, "SourceFilename", relativeToVRT="0").text = filename
    if open_options:
        options = ET.SubElement(source, "OpenOptions")
        for key, value in open_options.items():
            ET.SubElement(options, "OOI", key=key).text = str(value)
    ET.SubElement(source, "SourceBand").text = str(source_band)
    if props:  # GDAL then opens the source only when a read needs it (a mosaic of thousands of tiles opens at once)
        ET.SubElement(source, "SourceProperties", **{k: str(v) for k, v in props.items()})
    for tag, (x, y, w, h) in (("SrcRect", src_rect), ("DstRect", dst_rect)):
        ET.SubElement(source, tag, xOff=str(x), yOff=str(y), xSize=str(w), ySize=str(h))


def _vrt_text(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


# --- a folder or glob of GeoTIFF tiles -------------------------------------------------------------------------
def tile_files(imagery: str) -> list[Path]:
    """The GeoTIFFs of a tile folder (``.tif``/``.tiff`` directly in it) or glob (``**`` recurses), sorted."""
    if _GLOB_CHARS.search(imagery):
        files = [Path(p) for p in glob.glob(imagery, recursive=True)]
        where = "glob"
    else:
        folder = Path(imagery)
        if not folder.is_dir():
            raise ImagerySourceError(f"folder not found: {imagery}")
        files = list(folder.iterdir())
        where = "folder"
    files = sorted(p for p in files if p.is_file() and p.suffix.lower() in TILE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ImagerySourceError(f"{imagery}: {where} matches no GeoTIFF ({', '.join(TILE_SUFFIXES)}) tiles")
    return files


def mosaic_vrt(files: list[Path], source: str) -> str:
    """A mosaic VRT of GeoTIFF tiles on their union grid, as gdalbuildvrt writes it (later tiles win overlaps).

    Raises:
        ImagerySourceError: a tile without CRS or not north-up; two tiles that differ in CRS, pixel size, band
            count, pixel type or pixel grid (named, with what differs).
    """
    tiles = [_tile_header(p) for p in files]
    first = tiles[0]
    for tile in tiles[1:]:
        _same_kind(first, tile)
    res_x, res_y = first["res"]
    left = min(t["bounds"][0] for t in tiles)
    top = max(t["bounds"][3] for t in tiles)
    right = max(t["bounds"][2] for t in tiles)
    bottom = min(t["bounds"][1] for t in tiles)
    offsets = []
    for tile in tiles:
        col, row = (tile["bounds"][0] - left) / res_x, (top - tile["bounds"][3]) / res_y
        if abs(col - round(col)) > GRID_TOL_PX or abs(row - round(row)) > GRID_TOL_PX:
            raise ImagerySourceError(f"{source}: tiles {first['path']} and {tile['path']} are not on one pixel grid (offset "
                                     f"{col % 1:.3f}, {row % 1:.3f} px); a mosaic is never resampled: warp them onto one grid first")
        offsets.append((round(col), round(row)))
    width, height = round((right - left) / res_x), round((top - bottom) / res_y)
    if width >= 2**31 or height >= 2**31:
        raise ImagerySourceError(f"{source}: the tiles span {width} x {height} px, beyond GDAL's raster size")
    root = _vrt_root(width, height, first["crs"], rasterio.Affine(res_x, 0, left, 0, -res_y, top))
    blocks = {t["block"] for t in tiles}
    block = first["block"] if len(blocks) == 1 and first["block"][0] == first["block"][1] else None  # tiled alike; not strips
    nodata = next((t["nodata"] for t in tiles if t["nodata"] is not None), None)
    bands = [_vrt_band(root, "VRTRasterBand", first["dtype"], b, block) for b in range(1, first["count"] + 1)]
    for b, band in enumerate(bands):
        if nodata is not None:
            ET.SubElement(band, "NoDataValue").text = repr(float(nodata)) if not float(nodata).is_integer() else str(int(nodata))
        ET.SubElement(band, "ColorInterp").text = first["colorinterp"][b]
    mask = None
    if first["mask"]:  # the tiles carry a per-dataset mask (not alpha, not nodata): the mosaic's mask is theirs
        mask = _vrt_band(ET.SubElement(root, "MaskBand"), "VRTRasterBand", "uint8", None, block)
    for tile, (col, row) in zip(tiles, offsets):
        w, h = tile["size"]
        props = {"RasterXSize": w, "RasterYSize": h, "DataType": typename_fwd[dtype_rev[tile["dtype"]]],
                 "BlockXSize": tile["block"][1], "BlockYSize": tile["block"][0]}
        for b, band in enumerate(bands, start=1):
            _simple_source(band, str(tile["path"]), b, (0, 0, w, h), (col, row, w, h), props)
        if mask is not None:
            _simple_source(mask, str(tile["path"]), "mask,1", (0, 0, w, h), (col, row, w, h), props)
    return _vrt_text(root)


def _tile_header(path: Path) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # a tile without CRS is named below
            src = rasterio.open(path)
        with src:
            t = src.transform
            if src.crs is None:
                raise ImagerySourceError(f"tile {path} has no CRS; every tile of a mosaic needs one")
            if t.b != 0 or t.d != 0 or t.e >= 0:
                raise ImagerySourceError(f"tile {path} is not north-up (geotransform {tuple(t)[:6]}); warp it north-up first (gdalwarp)")
            flags = src.mask_flag_enums[0]
            per_dataset_mask = (rasterio.enums.MaskFlags.per_dataset in flags and rasterio.enums.MaskFlags.alpha not in flags
                                and rasterio.enums.MaskFlags.nodata not in flags)
            return {"path": path, "crs": src.crs, "res": (t.a, -t.e), "count": src.count, "dtype": src.dtypes[0],
                    "size": (src.width, src.height), "bounds": tuple(src.bounds), "nodata": src.nodata, "block": src.block_shapes[0],
                    "colorinterp": [c.name.capitalize() for c in src.colorinterp], "mask": per_dataset_mask}
    except rasterio.errors.RasterioError as exc:
        raise ImagerySourceError(f"tile {path} cannot be read as a raster: {exc}") from None


def _same_kind(a: dict, b: dict) -> None:
    """Two tiles of one mosaic must agree on CRS, pixel size, bands and pixel type (a mixed folder is refused, not
    warped: reprojecting or resampling tiles silently would change pixels the user never asked to change)."""
    pair = f"tiles {a['path']} and {b['path']}"
    if a["crs"] != b["crs"]:
        raise ImagerySourceError(f"{pair} differ in CRS ({a['crs'].to_string()} vs {b['crs'].to_string()}); a tile folder is one "
                                 "mosaic in one CRS: reproject the tiles to one CRS first (gdalwarp -t_srs)")
    if not all(math.isclose(x, y, rel_tol=RES_RTOL) for x, y in zip(a["res"], b["res"])):
        raise ImagerySourceError(f"{pair} differ in pixel size ({a['res'][0]!r} x {a['res'][1]!r} vs {b['res'][0]!r} x "
                                 f"{b['res'][1]!r}); resample them to one resolution first (gdalwarp -tr)")
    if a["count"] != b["count"]:
        raise ImagerySourceError(f"{pair} differ in band count ({a['count']} vs {b['count']}); all tiles need the same bands")
    if a["dtype"] != b["dtype"]:
        raise ImagerySourceError(f"{pair} differ in pixel type ({a['dtype']} vs {b['dtype']}); all tiles need the same pixel type")
    if a["nodata"] is not None and b["nodata"] is not None and a["nodata"] != b["nodata"]:
        raise ImagerySourceError(f"{pair} declare different nodata values ({a['nodata']} vs {b['nodata']})")


# --- MBTiles ---------------------------------------------------------------------------------------------------
def mbtiles_zooms(path: str) -> list[int]:
    """The zoom levels an MBTiles file holds tiles for (``SELECT DISTINCT zoom_level FROM tiles``), ascending."""
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
    try:
        with sqlite3.connect(uri, uri=True) as db:
            return [int(r[0]) for r in db.execute("SELECT DISTINCT zoom_level FROM tiles ORDER BY zoom_level")]
    except sqlite3.Error as exc:
        raise ImagerySourceError(f"{path}: not a readable MBTiles file ({exc})") from None


def mbtiles_vrt(path: str, zoom: int | None) -> str:
    """A VRT of an MBTiles file at ``zoom`` (default: its deepest): RGB bands, the alpha band as the mask."""
    if not Path(path).is_file():
        raise ImagerySourceError(f"file not found: {path}")
    zooms = mbtiles_zooms(path)
    if not zooms:
        raise ImagerySourceError(f"{path}: MBTiles file holds no tiles")
    zoom = zooms[-1] if zoom is None else zoom
    if zoom not in zooms:
        raise ImagerySourceError(f"{path}: MBTiles has no tiles at zoom {zoom}; it serves zoom(s) {', '.join(map(str, zooms))}")
    options = {"ZOOM_LEVEL": zoom, "BAND_COUNT": 4}  # 4 bands whatever the tile format: missing tiles have alpha 0
    try:
        with rasterio.open(path, **{k: str(v) for k, v in options.items()}) as src:
            width, height, transform, crs, block = src.width, src.height, src.transform, src.crs, src.block_shapes[0]
    except rasterio.errors.RasterioError as exc:
        raise ImagerySourceError(f"{path}: GDAL cannot open the MBTiles file at zoom {zoom}: {exc}") from None
    return _rgb_alpha_vrt(os.path.abspath(path), width, height, crs, transform, block, options)


def _rgb_alpha_vrt(filename: str, width: int, height: int, crs: CRS, transform, block: tuple[int, int], options: dict | None) -> str:
    """Bands 1-3 of a 4-band RGBA source as RGB, its band 4 as the per-dataset mask (alpha 0 = nodata)."""
    root = _vrt_root(width, height, crs, transform)
    rect = (0, 0, width, height)
    props = {"RasterXSize": width, "RasterYSize": height, "DataType": "Byte", "BlockXSize": block[1], "BlockYSize": block[0]}
    for b, colour in enumerate(("Red", "Green", "Blue"), start=1):
        band = _vrt_band(root, "VRTRasterBand", "uint8", b, block)
        ET.SubElement(band, "ColorInterp").text = colour
        _simple_source(band, filename, b, rect, rect, props, options)
    mask = _vrt_band(ET.SubElement(root, "MaskBand"), "VRTRasterBand", "uint8", None, block)
    _simple_source(mask, filename, 4, rect, rect, props, options)
    return _vrt_text(root)


# --- XYZ tile folders ------------------------------------------------------------------------------------------
def _xyz_folder(imagery: str) -> tuple[Path, str | None]:
    """The tile folder and, for a ``folder/{z}/{x}/{y}.png`` template, the tile suffix it names."""
    if "{z}" in imagery:
        head, _, tail = imagery.partition("{z}")
        suffix = Path(tail).suffix.lower() or None
        return Path(head.rstrip("/") or "."), suffix
    return Path(imagery), None


def _xyz_zoom_dirs(folder: Path) -> dict[int, Path]:
    out = {}
    try:
        for p in folder.iterdir():
            if p.name.isdigit() and p.is_dir() and int(p.name) <= MAX_ZOOM and any(q.name.isdigit() and q.is_dir() for q in p.iterdir()):
                out[int(p.name)] = p
    except OSError:
        return {}
    return dict(sorted(out.items()))


def xyz_tiles(folder: Path, zoom: int | None, suffix: str | None = None) -> tuple[int, list[tuple[int, int]], str]:
    """The zoom (default: the deepest zoom folder), the ``(x, y)`` tiles present at it and their suffix."""
    if not folder.is_dir():
        raise ImagerySourceError(f"folder not found: {folder}")
    zooms = _xyz_zoom_dirs(folder)
    if not zooms:
        raise ImagerySourceError(f"{folder}: no {{z}}/{{x}}/{{y}} tile folders (expected e.g. {folder}/18/<x>/<y>.png)")
    zoom = max(zooms) if zoom is None else zoom
    if zoom not in zooms:
        raise ImagerySourceError(f"{folder}: no tiles at zoom {zoom}; its zoom folders are {', '.join(map(str, zooms))}")
    tiles, suffixes = [], {}
    for x_dir in sorted(zooms[zoom].iterdir()):
        if not (x_dir.name.isdigit() and x_dir.is_dir()):
            continue
        for f in x_dir.iterdir():
            s = f.suffix.lower()
            if f.stem.isdigit() and s in XYZ_SUFFIXES and (suffix is None or s == suffix):
                tiles.append((int(x_dir.name), int(f.stem)))
                suffixes.setdefault(s, f)
    if not tiles:
        raise ImagerySourceError(f"{folder}: zoom folder {zoom} holds no {suffix or '|'.join(XYZ_SUFFIXES)} tiles")
    if len(suffixes) > 1:
        a, b = list(suffixes.values())[:2]
        raise ImagerySourceError(f"{folder}: zoom {zoom} mixes tile formats ({a} and {b}); give the one to read as "
                                 f"{folder}/{{z}}/{{x}}/{{y}}{a.suffix}")
    n = 2**zoom
    bad = next(((x, y) for x, y in tiles if x >= n or y >= n), None)
    if bad:
        raise ImagerySourceError(f"{folder}: tile {zoom}/{bad[0]}/{bad[1]} lies outside the zoom-{zoom} grid (0-{n - 1})")
    return zoom, sorted(tiles), next(iter(suffixes))


def xyz_vrt(folder: Path, zoom: int | None, suffix: str | None, wms_path: Path) -> tuple[str, str]:
    """The GDAL_WMS description of an XYZ folder (TMS minidriver, ``file://`` URLs, top origin, clipped to the tiles
    present) and the VRT over it (RGB, alpha as mask). Missing tiles read as zeros (alpha 0: nodata).

    The data window is the tile range itself (``TileX``/``TileY`` offsets), not the whole world: the world at zoom
    23+ is wider than GDAL's raster size limit. No overviews (``OverviewCount`` 0): a tile folder rarely holds every
    lower zoom, and a decimated read (the grid's valid-data mask) served from absent overview tiles would see no
    data at all.
    """
    folder = folder.absolute()
    zoom, tiles, suffix = xyz_tiles(folder, zoom, suffix)
    x0, x1 = min(x for x, _ in tiles), max(x for x, _ in tiles)
    y0, y1 = min(y for _, y in tiles), max(y for _, y in tiles)
    sample = folder / str(zoom) / str(tiles[0][0]) / f"{tiles[0][1]}{suffix}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # tile images carry no georeference
            src = rasterio.open(sample)
        with src:
            tile_px, count = src.width, src.count
            if src.height != tile_px:
                raise ImagerySourceError(f"{sample}: tile is {src.width} x {src.height} px; XYZ tiles must be square")
    except rasterio.errors.RasterioError as exc:
        raise ImagerySourceError(f"{sample}: tile cannot be read as an image: {exc}") from None
    if count not in (3, 4):
        raise ImagerySourceError(f"{sample}: tile has {count} band(s); XYZ imagery must be RGB or RGBA")
    span = 2 * WEB_MERCATOR_HALF_M / 2**zoom  # one tile's side in EPSG:3857 units (not ground metres: see module doc)
    nx, ny = (x1 - x0 + 1), (y1 - y0 + 1)
    left, top = -WEB_MERCATOR_HALF_M + x0 * span, WEB_MERCATOR_HALF_M - y0 * span
    wms = ET.Element("GDAL_WMS")
    service = ET.SubElement(wms, "Service", name="TMS")
    ET.SubElement(service, "ServerUrl").text = folder.as_uri() + "/${z}/${x}/${y}" + suffix
    window = ET.SubElement(wms, "DataWindow")
    for tag, value in (("UpperLeftX", left), ("UpperLeftY", top), ("LowerRightX", left + nx * span), ("LowerRightY", top - ny * span)):
        ET.SubElement(window, tag).text = repr(value)
    for tag, value in (("TileLevel", zoom), ("TileX", x0), ("TileY", y0), ("SizeX", nx * tile_px), ("SizeY", ny * tile_px),
                       ("TileCountX", 1), ("TileCountY", 1), ("YOrigin", "top")):
        ET.SubElement(window, tag).text = str(value)
    for tag, value in (("Projection", "EPSG:3857"), ("BlockSizeX", tile_px), ("BlockSizeY", tile_px), ("BandsCount", 4),
                       ("OverviewCount", 0), ("ZeroBlockHttpCodes", "204,404"), ("ZeroBlockOnServerException", "true")):
        ET.SubElement(wms, tag).text = str(value)
    res = span / tile_px
    transform = rasterio.Affine(res, 0, left, 0, -res, top)
    vrt = _rgb_alpha_vrt(str(wms_path.absolute()), nx * tile_px, ny * tile_px, CRS.from_epsg(3857), transform, (tile_px, tile_px), None)
    return _vrt_text(wms), vrt


# --- STAC items ------------------------------------------------------------------------------------------------
def stac_asset_href(item_path: str, asset: str | None) -> str:
    """The href of a STAC Item's imagery asset (``asset``, or the default choice), relative hrefs resolved against
    the item's location. Raises :class:`ImagerySourceError` listing the item's asset keys when none fits."""
    local = str(storage.local_path(item_path)) if storage.is_remote(item_path) else item_path
    if _is_remote(local):
        raise ImagerySourceError(f"{item_path}: a STAC item must be a local file or an s3:// or gs:// object")
    try:
        item = json.loads(Path(local).read_text())
    except FileNotFoundError:
        raise ImagerySourceError(f"file not found: {item_path}") from None
    except (OSError, ValueError) as exc:
        raise ImagerySourceError(f"{item_path}: not a readable JSON file ({exc})") from None
    assets = item.get("assets") if isinstance(item, dict) else None
    if not isinstance(assets, dict) or item.get("type") != "Feature":
        raise ImagerySourceError(f"{item_path}: not a STAC Item (a GeoJSON Feature with 'assets')")
    keys = ", ".join(assets) or "none"
    if asset:
        if asset not in assets:
            raise ImagerySourceError(f"{item_path}: STAC item has no asset {asset!r}; its assets: {keys}")
        key = asset
    else:
        key = next((k for k in STAC_DEFAULT_ASSETS if k in assets), None)
        if key is None:
            tiffs = [k for k, a in assets.items() if _tiff_like(a)]
            if len(tiffs) != 1:
                raise ImagerySourceError(f"{item_path}: STAC item has no {'/'.join(STAC_DEFAULT_ASSETS)} asset and "
                                         f"{len(tiffs)} GeoTIFF assets; name one with `asset:` (its assets: {keys})")
            key = tiffs[0]
    href = assets[key].get("href") if isinstance(assets[key], dict) else None
    if not href:
        raise ImagerySourceError(f"{item_path}: STAC asset {key!r} has no href")
    return _absolute_href(href, item_path)


def _resolve_stac(item_path: str, zoom: int | None, asset: str | None, out_dir: Path) -> str:
    href = stac_asset_href(item_path, asset)
    if imagery_form(href) == "stac":
        raise ImagerySourceError(f"{item_path}: STAC asset {href} is itself JSON, not imagery")
    try:
        return resolve_imagery(href, zoom=zoom, out_dir=out_dir)
    except ImagerySourceError as exc:
        raise ImagerySourceError(f"{item_path}: asset {href}: {exc}") from None


def _tiff_like(asset: object) -> bool:
    if not isinstance(asset, dict):
        return False
    media = str(asset.get("type") or "").lower()
    href = str(asset.get("href") or "").lower().split("?")[0]
    return "tiff" in media or (not media and href.endswith(TILE_SUFFIXES))


def _absolute_href(href: str, item_path: str) -> str:
    if href.startswith("file://"):
        return unquote(urlparse(href).path)
    if "://" in href or href.startswith("/vsi") or os.path.isabs(href):
        return href
    if _is_remote(item_path):  # an item in an object store: its relative hrefs are objects beside it
        scheme, rest = item_path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), href))}"
    return os.path.normpath(Path(item_path).absolute().parent / href)


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("/vsi")
