"""The vector city: road network, blocks, land use per block, buildings. Pure geometry in local metres.

Local frame: origin at the city centre, x east, y north, metres. The writer shifts it into the city's UTM zone.
Everything is vectorised with shapely 2 / numpy so a 2 km x 2 km city lays out in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import LineString, Polygon, box

from engine.schema import BUILT_UP_CLASSES, CLASS_ID
from engine.synth.config import CityParams

ARTERIAL_WIDTH_M = (24.0, 34.0)
LOCAL_WIDTH_M = (8.0, 13.0)
RIVER_WIDTH_M = (40.0, 110.0)


@dataclass(frozen=True)
class Buildings:
    """Building footprints (local metres) with what rendering and OSM need about each."""

    polygons: np.ndarray  # shapely Polygons
    height_m: np.ndarray  # levels x the floor height (about 3 m; more for sheds and shops): the shadows' height
    levels: np.ndarray  # int floors above ground
    block: np.ndarray  # index into CityLayout.blocks
    roof_rgb: np.ndarray  # (n, 3) float32, before the city's radiometric shift


@dataclass(frozen=True)
class CityLayout:
    """Everything the renderer and the OSM writer draw from; the single source of truth of a synthetic city."""

    side_m: float
    aoi: Polygon
    arterials: np.ndarray  # LineStrings
    arterial_width_m: np.ndarray
    local_streets: np.ndarray  # LineStrings
    local_width_m: np.ndarray
    road_surface: shapely.Geometry
    river_line: LineString | None
    river: shapely.Geometry | None
    blocks: np.ndarray  # Polygons
    block_class: np.ndarray  # int class ids (engine.schema.CLASS_ID)
    block_angle_rad: np.ndarray  # orientation of each block's street grid
    block_style: np.ndarray  # 0..1 per block: regularity (UV) / variant (formal residential)
    buildings: Buildings
    sports_fields: np.ndarray  # Polygons (running tracks of institutional blocks)

    def class_area_m2(self) -> dict[int, float]:
        areas = shapely.area(self.blocks)
        return {int(c): float(areas[self.block_class == c].sum()) for c in np.unique(self.block_class)}

    def uv_share_of_built_up(self) -> float:
        areas = shapely.area(self.blocks)
        built = np.isin(self.block_class, [CLASS_ID[c] for c in BUILT_UP_CLASSES])
        uv = self.block_class == CLASS_ID["urban_village"]
        total = float(areas[built].sum())
        return float(areas[uv].sum()) / total if total > 0 else 0.0


def build_layout(params: CityParams, side_m: float, rng: np.random.Generator) -> CityLayout:
    """Lay out one city: AOI, arterials, per-superblock local streets, river, blocks, land use, buildings."""
    half = side_m / 2.0
    extent = box(-half, -half, half, half)
    aoi = _aoi(rng, side_m)
    angle = np.radians(params.grid_angle_deg)

    arterials = _line_family(rng, side_m, angle, params.arterial_spacing_m, wobble_m=15.0)
    arterials += _line_family(rng, side_m, angle + np.pi / 2, params.arterial_spacing_m * rng.uniform(0.85, 1.15), wobble_m=15.0)
    arterials = np.array(arterials, dtype=object)
    arterial_width = rng.uniform(*ARTERIAL_WIDTH_M, size=len(arterials))

    superblocks = _polygonize(arterials, extent)
    local_lines, local_width, sb_angle = [], [], []
    for sb in superblocks:
        a = angle + np.radians(rng.normal(0, 6))
        spacing_u = rng.uniform(*params.local_spacing_m)
        spacing_v = rng.uniform(*params.local_spacing_m)
        lines = _line_family(rng, side_m, a, spacing_u, wobble_m=3.0) + _line_family(rng, side_m, a + np.pi / 2, spacing_v, wobble_m=3.0)
        # drop some local streets so block sizes vary (campuses, industrial estates, parks are larger)
        keep = rng.random(len(lines)) < 0.8
        clipped = shapely.intersection(np.array(lines, dtype=object)[keep], sb)
        clipped = clipped[~shapely.is_empty(clipped)]
        local_lines.extend(clipped.tolist())
        local_width.extend(rng.uniform(*LOCAL_WIDTH_M, size=len(clipped)).tolist())
        sb_angle.append((sb, a))
    local_streets = np.array(local_lines, dtype=object)
    local_width = np.array(local_width)

    road_surface = shapely.union_all(
        np.concatenate([shapely.buffer(arterials, arterial_width / 2, cap_style="flat"), shapely.buffer(local_streets, local_width / 2, cap_style="flat")])
    )
    river_line, river = None, None
    land = extent.difference(road_surface)
    if params.river:
        river_line = _line_family(rng, side_m * 1.2, angle + rng.uniform(-0.6, 0.6), side_m * 10, wobble_m=side_m * 0.08, count=1)[0]
        river = shapely.buffer(river_line, rng.uniform(*RIVER_WIDTH_M) / 2).intersection(extent)
        land = land.difference(river)
    blocks = np.array([g for g in shapely.get_parts(land) if g.area >= 150.0], dtype=object)
    blocks = blocks[shapely.intersects(blocks, aoi)]

    centroids = shapely.centroid(blocks)
    cx, cy = shapely.get_x(centroids), shapely.get_y(centroids)
    block_angle = np.full(len(blocks), angle)
    sb_tree = shapely.STRtree([sb for sb, _ in sb_angle])
    idx_block, idx_sb = sb_tree.query(centroids, predicate="within")
    block_angle[idx_block] = np.array([sb_angle[i][1] for i in idx_sb])

    block_class = _assign_land_use(rng, params, blocks, np.hypot(cx, cy) / half)
    block_style = rng.random(len(blocks))
    buildings, fields = draw_buildings(rng, params, blocks, block_class, block_angle, block_style)
    return CityLayout(
        side_m=side_m,
        aoi=aoi,
        arterials=arterials,
        arterial_width_m=arterial_width,
        local_streets=local_streets,
        local_width_m=local_width,
        road_surface=road_surface,
        river_line=river_line,
        river=river,
        blocks=blocks,
        block_class=block_class,
        block_angle_rad=block_angle,
        block_style=block_style,
        buildings=buildings,
        sports_fields=fields,
    )


# --- streets ---------------------------------------------------------------------------------------------------
def _line_family(rng: np.random.Generator, side_m: float, angle: float, spacing_m: float, wobble_m: float, count: int | None = None) -> list[LineString]:
    """Parallel, gently wavy lines across the whole extent: constant u in a frame rotated by ``angle``."""
    reach = side_m * 0.75  # beyond the corners of the square for any rotation
    if count is None:
        offsets = np.arange(-reach + rng.uniform(0, spacing_m), reach, spacing_m)
        offsets = offsets + rng.uniform(-0.12, 0.12, size=len(offsets)) * spacing_m
    else:
        offsets = rng.uniform(-0.25, 0.25, size=count) * side_m
    t = np.linspace(-reach, reach, 41)
    c, s = np.cos(angle), np.sin(angle)
    lines = []
    for u0 in offsets:
        phase, wavelength = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.5) * side_m
        u = u0 + wobble_m * np.sin(2 * np.pi * t / wavelength + phase)
        x, y = u * c - t * s, u * s + t * c
        lines.append(LineString(np.column_stack([x, y])))
    return lines


def _polygonize(lines: np.ndarray, extent: Polygon) -> list[Polygon]:
    noded = shapely.union_all(np.concatenate([shapely.intersection(lines, extent), [extent.exterior]]))
    return [p for p in shapely.get_parts(shapely.polygonize(shapely.get_parts(noded))) if p.area > 1.0]


def _aoi(rng: np.random.Generator, side_m: float) -> Polygon:
    """An irregular, star-shaped city outline covering most of the square (outside it is nodata)."""
    theta = np.linspace(0, 2 * np.pi, 73)[:-1]
    radius = np.ones_like(theta)
    for k in (2, 3, 5):
        radius += rng.uniform(0.02, 0.07) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    radius *= side_m * 0.56
    outline = Polygon(np.column_stack([radius * np.cos(theta), radius * np.sin(theta)]))
    half = side_m / 2 - 1e-6
    return outline.intersection(box(-half, -half, half, half))


# --- land use --------------------------------------------------------------------------------------------------
def _assign_land_use(rng: np.random.Generator, params: CityParams, blocks: np.ndarray, radius_norm: np.ndarray) -> np.ndarray:
    """Give every block a land use: first the non-UV mix with spatial preferences, then urban villages.

    Non-UV classes follow the city's mix with a radial preference (commerce in the centre, farmland and industry
    at the edge). Urban villages then replace built-up blocks, seeded away from the centre and grown into
    neighbouring blocks, until their share of built-up land is as close to the city's target as blocks allow.
    """
    areas = shapely.area(blocks)
    names = list(params.landuse_mix)
    target = np.array([params.landuse_mix[n] for n in names]) * areas.sum()
    affinity = {
        "formal_residential": lambda r: 1.2 - 0.4 * r,
        "commercial": lambda r: 2.5 * np.exp(-2.5 * r),
        "industrial": lambda r: 0.3 + 1.4 * r,
        "institutional": lambda r: np.ones_like(r),
        "green": lambda r: np.ones_like(r),
        "farmland": lambda r: 0.05 + 2.5 * r**3,
        "vacant": lambda r: 0.4 + r,
    }
    aff = np.stack([affinity[n](radius_norm) for n in names], axis=1)
    assigned = np.zeros(len(names))
    out = np.empty(len(blocks), dtype=np.int64)
    for i in rng.permutation(len(blocks)):
        remaining = np.clip(target - assigned, 0, None) + 1e-3 * target
        p = remaining * aff[i]
        k = rng.choice(len(names), p=p / p.sum())
        out[i] = CLASS_ID[names[k]]
        assigned[k] += areas[i]
    small = areas < 600  # traffic islands and slivers are green
    out[small] = CLASS_ID["green"]

    built_ids = [CLASS_ID[c] for c in BUILT_UP_CLASSES if c != "urban_village"]
    candidates = np.isin(out, built_ids) & ~small
    built_total = areas[np.isin(out, built_ids)].sum()
    uv_target = params.uv_share_target * built_total
    uv_area = 0.0
    # villages: seeds weighted to the middle and outer ring, then grown into touching candidate blocks
    weight = np.where(candidates, 0.3 + np.exp(-((radius_norm - 0.6) ** 2) / 0.08), 0.0)
    tree = shapely.STRtree(blocks)
    while uv_target - uv_area > 0 and weight.sum() > 0:
        seed = rng.choice(len(blocks), p=weight / weight.sum())
        frontier = [seed]
        while frontier:
            i = frontier.pop()
            if not candidates[i]:
                continue
            if abs(uv_area + areas[i] - uv_target) >= abs(uv_area - uv_target):
                candidates[i] = False
                weight[i] = 0.0
                continue
            out[i] = CLASS_ID["urban_village"]
            uv_area += areas[i]
            candidates[i] = False
            weight[i] = 0.0
            near = tree.query(blocks[i], predicate="dwithin", distance=LOCAL_WIDTH_M[1] + 1.0)
            frontier.extend(j for j in near.tolist() if candidates[j] and rng.random() < 0.6)
    return out


# --- buildings -------------------------------------------------------------------------------------------------
ROOF_PALETTES: dict[str, np.ndarray] = {
    "urban_village": np.array([[150, 82, 62], [118, 118, 116], [172, 168, 158], [72, 108, 150], [132, 96, 72], [186, 180, 170], [96, 90, 86]], np.float32),
    "formal_residential": np.array([[200, 195, 185], [172, 160, 150], [150, 152, 162], [192, 172, 150], [122, 130, 142]], np.float32),
    "commercial": np.array([[212, 212, 212], [100, 106, 112], [160, 170, 176], [62, 70, 82]], np.float32),
    "industrial": np.array([[226, 228, 232], [122, 162, 202], [62, 102, 172], [192, 196, 196], [202, 124, 84]], np.float32),
    "institutional": np.array([[182, 122, 100], [202, 196, 186], [160, 160, 150]], np.float32),
    "vacant": np.array([[140, 130, 120], [90, 110, 150]], np.float32),
}


def draw_buildings(rng: np.random.Generator, params: CityParams, blocks: np.ndarray, block_class: np.ndarray, block_angle: np.ndarray,
                   block_style: np.ndarray) -> tuple[Buildings, np.ndarray]:
    """The buildings of ``blocks`` by their land use (``Buildings.block`` indexes ``blocks``) and the running tracks
    of large institutional blocks; a later vintage builds its new blocks with it too."""
    polys, heights, levels, owner, roofs, fields = [], [], [], [], [], []
    for i, (block, cls_id, angle, style) in enumerate(zip(blocks, block_class, block_angle, block_style)):
        cls = _CLASS_NAME[int(cls_id)]
        spec = _building_spec(rng, cls, style, block.area, params)
        if spec is None:
            continue
        footprint = block
        if cls == "institutional" and block.area > 15_000:
            field = _sports_field(rng, block, angle)
            if field is not None:
                fields.append(field)
                footprint = block.difference(field.buffer(6.0))
        p, h, lv = _grid_rects(rng, footprint, angle, **spec)
        if len(p) == 0:
            continue
        palette = ROOF_PALETTES[cls]
        if cls in ("formal_residential", "institutional"):  # one estate, one roof colour
            base = np.repeat(palette[rng.integers(len(palette))][None], len(p), axis=0)
            roof = base + rng.normal(0, 5, size=(len(p), 3))
        else:
            roof = palette[rng.integers(len(palette), size=len(p))] + rng.normal(0, 10 if cls == "urban_village" else 6, size=(len(p), 3))
        polys.append(p)
        heights.append(h)
        levels.append(lv)
        owner.append(np.full(len(p), i))
        roofs.append(roof.astype(np.float32))
    if not polys:
        empty = np.array([], dtype=object)
        return (Buildings(empty, np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.float32)),
                np.array(fields, dtype=object))
    return (
        Buildings(np.concatenate(polys), np.concatenate(heights), np.concatenate(levels), np.concatenate(owner), np.concatenate(roofs)),
        np.array(fields, dtype=object),
    )


def _building_spec(rng: np.random.Generator, cls: str, style: float, area_m2: float, params: CityParams) -> dict | None:
    """Grid-layout parameters per land use: cell spacing, footprint size ranges, fill, irregularity, floors.

    Floors by land use (issue 18): urban villages 1-6 (the region's range, ``params.uv_floors``), formal residential
    6-33 (walk-ups 6-7, slabs 11-26, towers 18-33), industrial 1-3 tall floors; about 3 m a floor, more for sheds
    and shops. Urban villages also take the region's building density and size (``params.uv_density``,
    ``params.uv_size``).
    """
    if cls == "urban_village":
        # dense 3-8 m roofs, 1-2 m alleys; style = regularity (1: planned resettlement rows, 0: organic)
        # region: k scales plots and roofs (alleys with them), d the share of built plots and the alleys' share
        k, d = params.uv_size, params.uv_density
        cell = rng.uniform(5.5, 9.5) * k
        alley = cell * rng.uniform(0.13, 0.27) / d
        largest = max(3.2 * k, min(8.0 * k, cell - alley))
        size = (min(largest, max(3.0 * k, cell - alley - 1.2 * k * (1 - style))), largest)
        return dict(cell=(cell, cell * rng.uniform(0.9, 1.15)), size_u=size, size_v=size, fill=min(0.99, 0.93 * d),
                    rot_jitter_deg=9.0 * (1 - style), pos_jitter=0.8 * (1 - style), floors=params.uv_floors, floor_m=(2.8, 3.2),
                    lane_every=max(4, int(round(rng.integers(6, 10) * d**2))), margin=1.0)
    if cls == "formal_residential":
        if style < 0.2:  # 1980s walk-ups: dense rows that look like a village under haze
            return dict(cell=(rng.uniform(52, 66), rng.uniform(20, 25)), size_u=(40.0, 55.0), size_v=(10.0, 12.0), fill=0.95,
                        rot_jitter_deg=0.5, pos_jitter=0.05, floors=(6, 7), floor_m=(2.8, 3.0), lane_every=0, margin=5.0)
        if style < 0.6:  # slabs
            return dict(cell=(rng.uniform(48, 66), rng.uniform(30, 42)), size_u=(36.0, 56.0), size_v=(11.0, 15.0), fill=0.92,
                        rot_jitter_deg=0.5, pos_jitter=0.1, floors=(11, 26), floor_m=(2.9, 3.1), lane_every=0, margin=6.0)
        return dict(cell=(rng.uniform(34, 44),) * 2, size_u=(18.0, 24.0), size_v=(18.0, 24.0), fill=0.88,  # towers
                    rot_jitter_deg=0.5, pos_jitter=0.15, floors=(18, 33), floor_m=(2.9, 3.1), lane_every=0, margin=6.0)
    if cls == "commercial":
        return dict(cell=(rng.uniform(38, 60),) * 2, size_u=(24.0, 48.0), size_v=(20.0, 44.0), fill=0.85, rot_jitter_deg=1.0,
                    pos_jitter=0.3, floors=(3, 35), floor_m=(3.8, 4.4), lane_every=0, margin=5.0)
    if cls == "industrial":
        return dict(cell=(rng.uniform(50, 80), rng.uniform(36, 56)), size_u=(32.0, 68.0), size_v=(22.0, 44.0), fill=0.9,
                    rot_jitter_deg=0.5, pos_jitter=0.2, floors=(1, 3), floor_m=(4.5, 6.0), lane_every=0, margin=5.0)
    if cls == "institutional":
        return dict(cell=(rng.uniform(50, 65), rng.uniform(32, 45)), size_u=(34.0, 56.0), size_v=(14.0, 20.0), fill=0.7, rot_jitter_deg=0.5,
                    pos_jitter=0.2, floors=(3, 7), floor_m=(3.4, 3.8), lane_every=0, margin=6.0)
    if cls == "vacant" and area_m2 > 4000 and style > 0.7:  # a few sheds left on cleared land
        return dict(cell=(rng.uniform(40, 60),) * 2, size_u=(6.0, 15.0), size_v=(5.0, 10.0), fill=0.25, rot_jitter_deg=15.0,
                    pos_jitter=0.6, floors=(1, 1), floor_m=(3.0, 5.0), lane_every=0, margin=4.0)
    return None


def _grid_rects(rng: np.random.Generator, block: shapely.Geometry, angle: float, *, cell: tuple[float, float], size_u: tuple[float, float],
                size_v: tuple[float, float], fill: float, rot_jitter_deg: float, pos_jitter: float, floors: tuple[int, int],
                floor_m: tuple[float, float], lane_every: int, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rectangles on a jittered grid aligned with the block's streets, kept where they lie fully inside the block;
    returns ``(polygons, height_m, levels)``."""
    c, s = np.cos(angle), np.sin(angle)
    xy = shapely.get_coordinates(block)
    u, v = xy[:, 0] * c + xy[:, 1] * s, -xy[:, 0] * s + xy[:, 1] * c
    # fit a whole number of cells across the block (shrinking cells and footprints for small blocks)
    axes = []
    for lo, hi, step in ((u.min(), u.max(), cell[0]), (v.min(), v.max(), cell[1])):
        span = hi - lo - 2 * margin
        count = max(1, int(round(span / step)))
        step_eff = span / count
        axes.append((lo + margin + step_eff * (np.arange(count) + 0.5), min(1.0, step_eff / step)))
    (us, scale_u), (vs, scale_v) = axes
    if not (scale_u > 0.5 and scale_v > 0.5):
        return np.array([], dtype=object), np.zeros(0), np.zeros(0, np.int64)
    cell = (cell[0] * scale_u, cell[1] * scale_v)
    size_u = (size_u[0] * scale_u, size_u[1] * scale_u)
    size_v = (size_v[0] * scale_v, size_v[1] * scale_v)
    iu, iv = np.meshgrid(np.arange(len(us)), np.arange(len(vs)), indexing="ij")
    iu, iv = iu.ravel(), iv.ravel()
    keep = rng.random(len(iu)) < fill
    if lane_every:  # wider lanes every few rows/columns, as village main lanes
        keep &= (iu % lane_every != lane_every - 1) & (iv % (lane_every + 1) != lane_every)
    n = len(iu)
    w = rng.uniform(*size_u, size=n)
    h = rng.uniform(*size_v, size=n)
    cu = us[iu] + rng.uniform(-0.5, 0.5, n) * np.clip(cell[0] - w, 0, None) * pos_jitter
    cv = vs[iv] + rng.uniform(-0.5, 0.5, n) * np.clip(cell[1] - h, 0, None) * pos_jitter
    a = angle + np.radians(rng.normal(0, rot_jitter_deg, n)) if rot_jitter_deg else np.full(n, angle)
    cx, cy = cu * c - cv * s, cu * s + cv * c
    corner_u = np.array([-0.5, 0.5, 0.5, -0.5])
    corner_v = np.array([-0.5, -0.5, 0.5, 0.5])
    du = w[:, None] * corner_u[None]
    dv = h[:, None] * corner_v[None]
    ca, sa = np.cos(a)[:, None], np.sin(a)[:, None]
    px = cx[:, None] + du * ca - dv * sa
    py = cy[:, None] + du * sa + dv * ca
    inner = block.buffer(-margin)
    if inner.is_empty:
        return np.array([], dtype=object), np.zeros(0), np.zeros(0, np.int64)
    shapely.prepare(inner)
    inside = shapely.contains_xy(inner, px.ravel(), py.ravel()).reshape(n, 4).all(axis=1)
    keep &= inside
    rings = np.stack([px[keep], py[keep]], axis=-1)
    levels = rng.integers(floors[0], floors[1] + 1, size=n)
    heights = levels * rng.uniform(*floor_m, size=n)
    return shapely.polygons(rings), heights[keep], levels[keep].astype(np.int64)


def _sports_field(rng: np.random.Generator, block: shapely.Geometry, angle: float) -> Polygon | None:
    """A 400 m running track (about 170 x 90 m with its margin) placed inside a large institutional block."""
    inner = block.buffer(-50.0)
    if inner.is_empty:
        return None
    centre = shapely.get_coordinates(inner.representative_point())[0]
    length, width = rng.uniform(140, 175), rng.uniform(70, 90)
    track = shapely.buffer(LineString([(-length / 2 + width / 2, 0), (length / 2 - width / 2, 0)]), width / 2)
    c, s = np.cos(angle), np.sin(angle)
    track = shapely.transform(track, lambda xy: np.column_stack([xy[:, 0] * c - xy[:, 1] * s + centre[0], xy[:, 0] * s + xy[:, 1] * c + centre[1]]))
    return track if block.contains(track) else None


_CLASS_NAME = {v: k for k, v in CLASS_ID.items()}
