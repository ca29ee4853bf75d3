"""Render a CityLayout to an RGB image and a truth class raster, with each land use's visual signature.

Vectorised: rasterio.features.rasterize burns all polygons of a kind in one call; textures come from low-res noise
upsampled with scipy, never per-pixel Python. Order of burning: ground by land use, vegetation, shadows, roofs,
then the city-wide radiometric shift (colour balance, haze, blur, clouds, sensor noise).

A later vintage of a city (engine.synth.vintage) is rendered by the same code from the first date's
:class:`Ground` (block raster and texture fields, so unchanged land looks the same) with a :class:`Look`: the
misregistration of its content, another sensor's band mixing and offsets, the season's vegetation, grown trees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize
from scipy import ndimage
from scipy.special import ndtri

from engine.schema import CLASS_ID
from engine.synth.config import CityParams
from engine.synth.layout import CityLayout

NODATA = 0

# ground colour (R, G, B) and share of vegetation cover per land use
GROUND: dict[str, tuple[tuple[float, float, float], float, float]] = {
    # class: (rgb, vegetation share, texture amplitude)
    "road": ((92, 92, 94), 0.0, 6.0),
    "urban_village": ((98, 90, 82), 0.03, 14.0),
    "formal_residential": ((132, 136, 118), 0.45, 10.0),
    "commercial": ((168, 166, 160), 0.10, 8.0),
    "industrial": ((152, 146, 134), 0.05, 12.0),
    "institutional": ((136, 140, 120), 0.35, 10.0),
    "green": ((84, 110, 62), 0.75, 12.0),
    "water": ((44, 70, 82), 0.0, 3.0),
    "farmland": ((130, 146, 86), 0.0, 10.0),
    "vacant": ((166, 146, 116), 0.12, 16.0),
}
FIELD_PALETTE = np.array([[112, 142, 72], [152, 160, 92], [162, 142, 102], [92, 122, 62], [182, 170, 122]], np.float32)
VEGETATION_RGB = np.array([56, 84, 46], np.float32)
TRACK_RGB = np.array([176, 84, 70], np.float32)
PITCH_RGB = np.array([72, 128, 66], np.float32)
HAZE_RGB = np.array([196, 200, 206], np.float32)
CLOUD_RGB = np.array([244, 245, 248], np.float32)


DRY_VEGETATION_RGB = np.array([122, 110, 76], np.float32)  # leaf-off and dry-season canopy and grass
BARE_FIELD_RGB = np.array([164, 146, 112], np.float32)  # ploughed or fallow fields


@dataclass(frozen=True)
class Look:
    """How another acquisition of the same ground looks, beyond what :class:`CityParams` draws (sun, haze, gains,
    blur, noise, clouds): what a later vintage's image adds. The default changes nothing.

    Attributes:
        shift_px: ``(columns east, rows south)`` the scene's content moves on the pixel grid: the misregistration of
            an archive image whose georeferencing is taken as it is.
        band_offset: per-band offset (DN) of the sensor's calibration.
        band_mix: 3 x 3 mixing of the bands (rows: output band): another sensor's spectral response.
        dryness: 0 (growing season) to 1 (leaf-off winter or dry season): vegetation and fields turn towards dry
            colours.
        tree_growth: vegetation cover of every block x (1 + tree_growth), as canopies widen between dates.
    """

    shift_px: tuple[float, float] = (0.0, 0.0)
    band_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    band_mix: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    dryness: float = 0.0
    tree_growth: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Ground:
    """What a rendering drew about the ground itself: block raster, AOI mask and the random fields of material,
    brightness and vegetation. A later vintage renders from the first's, so unchanged ground looks the same at both
    dates (trees stand where they stood) and only the changes, the sensor, the season and the sky differ."""

    base_truth: np.ndarray  # uint8 (H, W): road and water before blocks are burned
    block_ids: np.ndarray  # int32 (H, W): block index + 1, 0 = road or river
    aoi_mask: np.ndarray  # bool (H, W)
    block_offset: np.ndarray  # (n_blocks, 3) ground colour offset of each block
    farm_salt: int | None  # the farmland strips' colour draw (None: the city had no farmland)
    fine: np.ndarray  # float32 (H, W) texture fields, unit variance
    coarse: np.ndarray
    veg_field: np.ndarray
    canopy: np.ndarray


@dataclass(frozen=True)
class Scene:
    """A rendered city: ``rgb`` uint8 (3, H, W), ``truth`` uint8 (H, W), the local transform and the ground drawn."""

    rgb: np.ndarray
    truth: np.ndarray
    transform: Affine
    ground: Ground


def render_city(layout: CityLayout, params: CityParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Affine]:
    """Draw the image and the truth raster of a laid-out city.

    Args:
        layout: the vector city in local metres.
        params: the city's draw (pixel size, sun, haze, colour balance, noise, clouds).
        rng: the city's random generator.

    Returns:
        ``(rgb, truth, transform)``: ``rgb`` uint8 (3, H, W) with 0 = nodata outside the AOI, ``truth`` uint8
        (H, W) class ids of :data:`engine.schema.LANDUSE_CLASSES`, and the local-metre affine transform.
    """
    scene = render_scene(layout, params, rng)
    return scene.rgb, scene.truth, scene.transform


def render_scene(layout: CityLayout, params: CityParams, rng: np.random.Generator, look: Look | None = None,
                 ground: Ground | None = None) -> Scene:
    """Draw a city as :func:`render_city` does, optionally as another acquisition of ground drawn before.

    Args:
        layout: the vector city in local metres (a later vintage: the same blocks, other classes and buildings).
        params: the acquisition's draw (pixel size, which must equal the ground's, sun, haze, gains, noise, clouds).
        rng: the generator of everything not in ``ground`` (all of it when ``ground`` is None).
        look: what else differs in this acquisition (misregistration, sensor, season, tree growth); None: nothing.
        ground: the ground fields of an earlier rendering of the same city; None: drawn here from ``rng``, in the
            order :func:`render_city` always drew them (so a city's first date is byte-identical to a single date).
    """
    px = params.pixel_size_m
    size = int(round(layout.side_m / px))
    half = size * px / 2.0
    transform = Affine(px, 0.0, -half, 0.0, -px, half)
    shape = (size, size)
    if ground is None:
        ground = _draw_ground(layout, shape, transform, px, rng)
    elif ground.block_ids.shape != shape:
        raise ValueError(f"ground drawn on a {ground.block_ids.shape} grid, this rendering's is {shape}: the pixel size differs")
    block_ids, fine, coarse = ground.block_ids, ground.fine, ground.coarse

    # land use per pixel; blocks are numbered from 1 so that 0 means road/river (not a block)
    truth = ground.base_truth.copy()
    in_block = block_ids > 0
    block_class = np.concatenate([[0], layout.block_class]).astype(np.uint8)
    truth[in_block] = block_class[block_ids[in_block]]

    # ground colour: per-class base + per-block offset, looked up by block id
    dryness = look.dryness if look is not None else 0.0
    n_blocks = len(layout.blocks) + 1
    class_names = {v: k for k, v in CLASS_ID.items()}
    base = np.zeros((n_blocks, 3), np.float32)
    veg_share = np.zeros(n_blocks, np.float32)
    texture_amp = np.zeros(n_blocks, np.float32)
    for b in range(1, n_blocks):
        name = class_names[int(layout.block_class[b - 1])]
        rgb, veg, amp = GROUND[name]
        rgb = np.asarray(rgb, np.float32)
        if dryness and name in ("green", "farmland"):
            rgb = rgb + (DRY_VEGETATION_RGB - rgb) * np.float32(0.6 * dryness)
        base[b] = rgb + ground.block_offset[b - 1]
        veg_share[b], texture_amp[b] = veg, amp
    if look is not None and look.tree_growth:
        veg_share = np.where(veg_share > 0, np.minimum(veg_share * np.float32(1.0 + look.tree_growth), np.float32(0.95)), veg_share)
    road_rgb, _, road_amp = GROUND["road"]
    water_rgb, _, water_amp = GROUND["water"]
    base[0], texture_amp[0] = road_rgb, road_amp
    img = base[block_ids].transpose(2, 0, 1).copy()  # (3, H, W)
    amp = texture_amp[block_ids]
    on_water = (truth == CLASS_ID["water"]) & ~in_block
    img[:, on_water] = np.asarray(water_rgb, np.float32)[:, None]
    amp[on_water] = water_amp

    yy, xx = _pixel_centres_m(shape, transform)
    palette = FIELD_PALETTE if not dryness else FIELD_PALETTE + (BARE_FIELD_RGB - FIELD_PALETTE) * np.float32(0.7 * dryness)
    _paint_farmland(img, layout, block_ids, xx, yy, ground.farm_salt, palette)
    _paint_fields(img, layout, shape, transform)

    # fine texture (material, clutter) and coarse brightness variation
    img += (fine * amp + coarse * amp * 0.6)[None]

    # vegetation: threshold a smooth field at the block's vegetation share; canopies get their own texture
    with np.errstate(divide="ignore"):
        threshold = ndtri(1.0 - np.clip(veg_share, 1e-6, 1 - 1e-6)).astype(np.float32)
    vegetated = (ground.veg_field > threshold[block_ids]) & in_block
    vegetation = VEGETATION_RGB if not dryness else VEGETATION_RGB + (DRY_VEGETATION_RGB - VEGETATION_RGB) * np.float32(dryness)
    img[:, vegetated] = vegetation[:, None] + (ground.canopy[vegetated] * 14.0)[None]

    # shadows of buildings (prisms lit by the sun), then roofs over them
    b = layout.buildings
    if len(b.polygons):
        shadows = _shadows(b.polygons, b.height_m, params)
        shadow_mask = rasterize(((g, 1) for g in shadows), out_shape=shape, transform=transform, fill=0, dtype="uint8").astype(bool)
        img[:, shadow_mask] *= 0.5
        roof_ids = rasterize(zip(b.polygons, range(1, len(b.polygons) + 1)), out_shape=shape, transform=transform, fill=0, dtype="int32")
        roofs = np.concatenate([np.zeros((1, 3), np.float32), b.roof_rgb])
        on_roof = roof_ids > 0
        img[:, on_roof] = roofs[roof_ids[on_roof]].T + (fine[on_roof] * 6.0)[None]

    if look is not None and any(look.shift_px):  # the content moves on the grid; the sky and the sensor do not
        img = _shift_content(img, *look.shift_px)
    img = _radiometry(img, params, rng, shape, px, look)
    rgb = np.clip(np.rint(img), 1, 255).astype(np.uint8)
    rgb[:, ~ground.aoi_mask] = NODATA
    truth[~ground.aoi_mask] = CLASS_ID["nodata"]
    return Scene(rgb, truth, transform, ground)


def _shift_content(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``img`` (bands, rows, cols) with its content moved ``dx`` columns and ``dy`` rows (subpixel: bilinear; the
    edges repeat). Separable gathers: several times faster than ``scipy.ndimage.shift`` and the same inside."""
    out = img
    for axis, s in ((2, dx), (1, dy)):
        n = out.shape[axis]
        k = int(np.floor(s))
        f = np.float32(s - k)
        i = np.arange(n)
        moved = out.take(np.clip(i - k, 0, n - 1), axis=axis)
        if f:
            moved *= np.float32(1.0) - f
            moved += f * out.take(np.clip(i - k - 1, 0, n - 1), axis=axis)
        out = moved
    return out


def _draw_ground(layout: CityLayout, shape: tuple[int, int], transform: Affine, px: float, rng: np.random.Generator) -> Ground:
    """Rasterise the blocks and draw the ground's random fields, in the order the renderer has always drawn them
    (block colour offsets, the farmland salt, fine and coarse texture, vegetation and canopy fields)."""
    shapes = []
    if layout.river is not None:
        shapes.append((layout.river, CLASS_ID["water"]))
    shapes.append((layout.road_surface, CLASS_ID["road"]))
    base_truth = rasterize(shapes, out_shape=shape, transform=transform, fill=CLASS_ID["road"], dtype="uint8")
    block_ids = rasterize(zip(layout.blocks, range(1, len(layout.blocks) + 1)), out_shape=shape, transform=transform, fill=0, dtype="int32")
    offset = np.array([rng.normal(0, 6, 3) for _ in range(len(layout.blocks))]).reshape(len(layout.blocks), 3)
    farm_salt = int(rng.integers(0, 1 << 30)) if (layout.block_class == CLASS_ID["farmland"]).any() else None
    fine = _smooth_noise(rng, shape, 1.2 / px)
    coarse = _smooth_noise(rng, shape, 25.0 / px)
    veg_field = _smooth_noise(rng, shape, 6.0 / px)
    canopy = _smooth_noise(rng, shape, 1.5 / px)
    aoi_mask = rasterize([(layout.aoi, 1)], out_shape=shape, transform=transform, fill=0, dtype="uint8").astype(bool)
    return Ground(base_truth, block_ids, aoi_mask, offset, farm_salt, fine, coarse, veg_field, canopy)


def _pixel_centres_m(shape: tuple[int, int], transform: Affine) -> tuple[np.ndarray, np.ndarray]:
    rows = transform.f + transform.e * (np.arange(shape[0], dtype=np.float32) + 0.5)
    cols = transform.c + transform.a * (np.arange(shape[1], dtype=np.float32) + 0.5)
    return rows[:, None], cols[None, :]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with features about ``scale_px`` pixels across (upsampled low-res noise)."""
    scale_px = max(scale_px, 1.0)
    low_shape = (int(np.ceil(shape[0] / scale_px)) + 3, int(np.ceil(shape[1] / scale_px)) + 3)
    low = rng.standard_normal(low_shape).astype(np.float32)
    if scale_px <= 1.0:
        field = low[: shape[0], : shape[1]]
    else:
        field = ndimage.zoom(low, scale_px, order=1, prefilter=False, grid_mode=False)[: shape[0], : shape[1]]
    std = float(field.std()) or 1.0
    return (field - float(field.mean())) / std


def _paint_farmland(img: np.ndarray, layout: CityLayout, block_ids: np.ndarray, xx: np.ndarray, yy: np.ndarray, salt: int | None,
                    palette: np.ndarray) -> None:
    """Fields as parallel strips of crops at different stages (``palette``), oriented with the block; ``salt`` picks
    the strips' colours (drawn with the ground, so a field keeps its strips at a later date)."""
    farm_blocks = np.flatnonzero(layout.block_class == CLASS_ID["farmland"])
    if len(farm_blocks) == 0:
        return
    mask = np.isin(block_ids, farm_blocks + 1)
    rows, cols = np.nonzero(mask)
    bid = block_ids[rows, cols] - 1
    angle = layout.block_angle_rad[bid] + np.where(layout.block_style[bid] > 0.5, np.pi / 2, 0.0)
    strip_w = 12.0 + 30.0 * layout.block_style[bid]
    along = xx[0, cols] * np.cos(angle) + yy[rows, 0] * np.sin(angle)
    strip = np.floor(along / strip_w).astype(np.int64)
    pick = (strip * 7919 + bid * 104729 + (salt or 0)) % len(palette)
    img[:, rows, cols] = palette[pick].T


def _paint_fields(img: np.ndarray, layout: CityLayout, shape: tuple[int, int], transform: Affine) -> None:
    """Running tracks (red) with a pitch (green) inside, on institutional blocks."""
    if len(layout.sports_fields) == 0:
        return
    pitches = shapely.buffer(layout.sports_fields, -8.0)
    burned = rasterize([(g, 1) for g in layout.sports_fields] + [(g, 2) for g in pitches if not g.is_empty],
                       out_shape=shape, transform=transform, fill=0, dtype="uint8")
    img[:, burned == 1] = TRACK_RGB[:, None]
    img[:, burned == 2] = PITCH_RGB[:, None]


def _shadows(polygons: np.ndarray, heights_m: np.ndarray, params: CityParams) -> np.ndarray:
    """Shadow of each building as the hull of its footprint and the footprint moved away from the sun."""
    az = np.radians(params.sun_azimuth_deg)
    length = heights_m / np.tan(np.radians(params.sun_elevation_deg))
    dx, dy = -np.sin(az) * length, -np.cos(az) * length  # azimuth clockwise from north; shadow points away
    ring = shapely.get_coordinates(shapely.get_exterior_ring(polygons))
    counts = shapely.get_num_coordinates(shapely.get_exterior_ring(polygons))
    owner = np.repeat(np.arange(len(polygons)), counts)
    moved = ring + np.column_stack([dx[owner], dy[owner]])
    pts = np.concatenate([ring, moved])
    idx = np.concatenate([owner, owner])
    order = np.argsort(idx, kind="stable")
    return shapely.convex_hull(shapely.multipoints(shapely.points(pts[order]), indices=idx[order]))


def _radiometry(img: np.ndarray, params: CityParams, rng: np.random.Generator, shape: tuple[int, int], px: float,
               look: Look | None = None) -> np.ndarray:
    """The city's sensor and atmosphere: colour balance (with ``look``: band mixing and offsets too), optics blur,
    haze, clouds, noise."""
    img *= np.asarray(params.color_gain, np.float32)[:, None, None]
    if look is not None:
        mix = np.asarray(look.band_mix, np.float32)
        img = np.einsum("ij,jhw->ihw", mix, img) + np.asarray(look.band_offset, np.float32)[:, None, None]
    if params.blur_px > 0:
        img = ndimage.gaussian_filter(img, sigma=(0, params.blur_px, params.blur_px))
    if params.haze > 0:
        haze = params.haze * (1.0 + 0.25 * _smooth_noise(rng, shape, 150.0 / px))
        haze = np.clip(haze, 0.0, 0.9)[None]
        img = img * (1.0 - haze) + HAZE_RGB[:, None, None] * haze
    if params.cloud_cover > 0:
        field = _smooth_noise(rng, shape, 160.0 / px) + 0.3 * _smooth_noise(rng, shape, 30.0 / px)
        cut = np.quantile(field[:: 8, :: 8], 1.0 - params.cloud_cover)
        opacity = np.clip((field - cut) / 0.8, 0.0, 1.0) ** 0.7
        shift = int(round(30.0 / px))
        shadow = np.roll(opacity, (shift, shift), axis=(0, 1))
        img *= (1.0 - 0.35 * shadow)[None]
        img = img * (1.0 - opacity[None]) + CLOUD_RGB[:, None, None] * opacity[None]
    if look is None:
        img += rng.normal(0.0, params.noise_dn, size=img.shape).astype(np.float32)
    else:  # a later date draws its noise in float32 directly: a third faster, and no first date's draws to keep
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(params.noise_dn)
    return img
