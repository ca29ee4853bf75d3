"""Vintages: one synthetic city drawn at several dates on the same ground, with the truth of what changed.

Why: mapping urban-village change (issue 22) needs pairs of images of the same city years apart whose differences
are the ones real archives have, and a census of the change to check the change map against. A city's first
vintage is exactly the single-date city (the same draws of the same generator, so its files are byte-identical to
``generate_city``'s); each later vintage evolves the one before it from a generator of its own, seeded from
``(seed, crc32(slug), crc32("vintage:" + name))``, so the first date's draws are untouched:

- the ground changes (:func:`evolve_layout`): clustered renewal projects demolish villages (to construction land)
  or redevelop them (formal residential or commercial estates), new villages grow on open land at the edge of the
  built-up area, and everything else stands with small changes (roofs recoloured, trees grown);
- the image changes (:func:`draw_acquisition`): another sensor (gains, offsets, band mixing, blur, noise), season
  (vegetation colour, sun elevation), sun azimuth, haze and clouds, and a 0-3 px misregistration of the content on
  an unchanged pixel grid; the ground's own texture fields are the first date's, so unchanged land looks the same;
- OSM changes as its history does (:func:`update_osm`): features keep their ids, mapping grows on unchanged ground,
  mappers update a changed block or leave its stale features and tags for a while.

Outputs under ``cities/<city>/``: ``<vintage>/`` with each date's usual files, ``change_truth.tif`` (codes
:data:`CHANGE_CODES`, first date vs last) and ``change_blocks.parquet`` (each block's class per date and fate).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import shapely
from affine import Affine

from engine.geo import WGS84
from engine.geoparquet import write_geoparquet
from engine.schema import BUILT_UP_CLASSES, CITY_SLUG_RE, CLASS_ID, LANDUSE_CLASSES
from engine.synth.city import CityDraw, CitySpec, buildings_file, draw_city, local_to_wgs84, reference_polygons, write_city, write_raster
from engine.synth.config import CityParams, SynthConfig, VintageConfig
from engine.synth.layout import ROOF_PALETTES, Buildings, CityLayout, draw_buildings
from engine.synth.osm import OsmDraw, draw_osm
from engine.synth.render import Look, render_scene

__all__ = ["VintageConfig", "check_vintages", "vintage_rng", "draw_acquisition", "evolve_layout", "update_osm", "change_truth",
           "block_fates", "generate_city_vintages", "CHANGE_CODES", "CHANGE_NODATA", "FATES"]

UV = CLASS_ID["urban_village"]
VACANT = CLASS_ID["vacant"]
# change_truth.tif codes (the same as engine.change.codes, the change map's)
CHANGE_CODES: dict[str, int] = {"other": 0, "persistent_uv": 1, "demolished_uv": 2, "new_uv": 3}
CHANGE_NODATA = 255
# a block's fate between two dates
FATES: tuple[str, ...] = ("other", "persisted", "demolished", "redeveloped", "new_uv")
OTHER, PERSISTED, DEMOLISHED, REDEVELOPED, NEW_UV = range(len(FATES))
OPEN_LAND = ("vacant", "farmland", "green")  # where new villages are built
FRINGE_M = 40.0  # a new village starts on open land within this distance of built-up land: the edge of the city
NEW_UV_REACH_M = 40.0  # and spreads to open blocks within this distance of its first block (across a street)
SMALL_BLOCK_M2 = 600.0  # traffic islands and slivers (the layout makes them green): never built on


def check_vintages(vintages: Sequence[str] | str) -> tuple[str, ...]:
    """The vintage names as a tuple when they are valid: at least two, each a slug (they become folder names),
    unique and in chronological order, which is ascending order of the names (``2018`` before ``2024``); else a
    ValueError saying what is wrong. A string is split at commas (``"2018,2024"``).

    >>> check_vintages("2018,2024")
    ('2018', '2024')
    >>> check_vintages(("2024", "2018"))
    Traceback (most recent call last):
    ...
    ValueError: vintages ['2024', '2018'] must be in chronological order, which is ascending order of their names: ['2018', '2024']
    """
    names = tuple(v.strip() for v in vintages.split(",") if v.strip()) if isinstance(vintages, str) else tuple(vintages)
    if len(names) < 2:
        raise ValueError(f"vintages {list(names)}: give at least two dates (for example 2018,2024)")
    bad = [v for v in names if not isinstance(v, str) or not CITY_SLUG_RE.match(v)]
    if bad:
        raise ValueError(f"vintages {bad}: each must be a lowercase slug (letters, digits, '-' and '_', matching {CITY_SLUG_RE.pattern})")
    if len(set(names)) != len(names):
        raise ValueError(f"vintages {list(names)}: each date may be given once")
    if list(names) != sorted(names):
        raise ValueError(f"vintages {list(names)} must be in chronological order, which is ascending order of their names: {sorted(names)}")
    return names


def vintage_rng(seed: int, city: str, vintage: str) -> np.random.Generator:
    """A later vintage's own generator: from the run seed, the slug and the vintage's name only, sharing no draws
    with the city's (:func:`engine.synth.city.city_rng`), so the first date stays byte-identical."""
    return np.random.default_rng([int(seed), zlib.crc32(city.encode()), zlib.crc32(f"vintage:{vintage}".encode())])


# --- the acquisition -------------------------------------------------------------------------------------------
def draw_acquisition(cfg: SynthConfig, params: CityParams, step: int, rng: np.random.Generator) -> tuple[CityParams, Look, dict]:
    """Another image of the same ground: the later date's :class:`CityParams` (the first's ground, another sensor,
    sky and OSM completeness), its :class:`Look` and a record of the season drawn.

    The season drives the sun's elevation (about 70 deg at midsummer to 30 deg at midwinter, so shadows lengthen)
    and the vegetation's dryness together; azimuth, haze, clouds, gains, blur and noise come from the same ranges
    as a first date's; the misregistration is 0 to ``max_shift_px`` pixels in any direction. ``params`` is the
    previous date's (its OSM completeness grows by ``osm_growth`` of what is missing); ``step`` counts dates after
    the first (tree growth compounds).
    """
    v = cfg.vintage
    season = float(rng.random())  # 0: midsummer, growing season; 1: midwinter or the dry season
    elevation = float(np.clip(70.0 - 40.0 * season + rng.normal(0.0, 4.0), 25.0, 75.0))
    azimuth = float(rng.uniform(120, 240))
    haze = float(rng.uniform(0.0, cfg.haze_max) ** 1.3 / cfg.haze_max**0.3) if cfg.haze_max > 0 else 0.0
    gain = tuple(float(g) for g in rng.uniform(0.85, 1.15, size=3))
    blur = float(rng.uniform(0.3, 1.3))
    noise = float(rng.uniform(1.0, 6.0))
    clouds = rng.random() < cfg.cloud_prob
    cover = float(rng.uniform(0.04, 0.2))
    direction, magnitude = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.0, v.max_shift_px))
    offset = rng.uniform(-v.sensor_offset_dn, v.sensor_offset_dn, size=3)
    leak = rng.uniform(0.0, v.sensor_crosstalk, size=(3, 3)) * (1 - np.eye(3))
    mix = leak + np.diag(1.0 - leak.sum(axis=1))  # rows sum to 1: overlapping bands desaturate, brightness stays
    later = replace(params, sun_azimuth_deg=azimuth, sun_elevation_deg=elevation, haze=haze, color_gain=gain, blur_px=blur,  # type: ignore[arg-type]
                    noise_dn=noise, cloud_cover=cover if clouds else 0.0,
                    osm_completeness=float(params.osm_completeness + v.osm_growth * (1.0 - params.osm_completeness)))
    look = Look(shift_px=(round(magnitude * np.cos(direction), 4), round(magnitude * np.sin(direction), 4)),
                band_offset=tuple(round(float(o), 3) for o in offset),  # type: ignore[arg-type]
                band_mix=tuple(tuple(round(float(x), 5) for x in row) for row in mix),
                dryness=round(v.season_dryness_max * season, 4), tree_growth=round((1.0 + v.tree_growth) ** step - 1.0, 6))
    return later, look, {"season": round(season, 4), "shift_px_magnitude": round(magnitude, 4)}


# --- the ground ------------------------------------------------------------------------------------------------
def evolve_layout(layout: CityLayout, params: CityParams, v: VintageConfig, rng: np.random.Generator,
                  ever_uv: np.ndarray | None = None) -> tuple[CityLayout, np.ndarray]:
    """The ground at the next date and each block's fate (an index into :data:`FATES`) since ``layout``'s.

    Renewal comes in projects (:func:`_projects`): a village block drawn with preference for the inner city, where
    land is worth most, and its village neighbours within ``renewal_reach_m``; first the demolitions (cleared to
    ``vacant`` construction land, a few site sheds at most), then the redevelopments (new formal estates of slabs or
    towers, or commercial blocks, one class per project). New villages start on open land (vacant, farmland, green)
    within :data:`FRINGE_M` of built-up land, further out more likely, and spread to open neighbours; land that was a
    village before (``ever_uv``) is not settled again. Targets are areas inside the AOI, shares of the earlier date's
    UV area. Buildings on unchanged blocks stand as they were, ``roof_recolour_share`` of them with a new roof.
    """
    n = len(layout.blocks)
    cls = layout.block_class
    areas = shapely.area(shapely.intersection(layout.blocks, layout.aoi)) if n else np.zeros(0)
    centre = shapely.centroid(layout.blocks) if n else np.zeros(0, object)
    radius = np.hypot(shapely.get_x(centre), shapely.get_y(centre)) / (layout.side_m / 2.0) if n else np.zeros(0)
    is_uv = cls == UV
    uv_area = float(areas[is_uv].sum())
    ever_uv = is_uv if ever_uv is None else (ever_uv | is_uv)
    tree = shapely.STRtree(layout.blocks)

    inner_first = np.exp(-1.5 * radius)
    demolished = _projects(rng, layout.blocks, tree, areas, is_uv, inner_first, v.demolish_share * uv_area, v.renewal_reach_m) >= 0
    redevelop_project = _projects(rng, layout.blocks, tree, areas, is_uv & ~demolished, inner_first, v.redevelop_share * uv_area,
                                  v.renewal_reach_m)
    redeveloped = redevelop_project >= 0
    commercial = rng.random(int(redevelop_project.max()) + 1 if n else 0) < v.redevelop_commercial_prob

    open_land = np.isin(cls, [CLASS_ID[c] for c in OPEN_LAND]) & (areas >= SMALL_BLOCK_M2) & ~ever_uv
    built = np.isin(cls, [CLASS_ID[c] for c in BUILT_UP_CLASSES])
    fringe = np.zeros(n, bool)
    if built.any() and open_land.any():
        near = tree.query(layout.blocks[built], predicate="dwithin", distance=FRINGE_M)[1]
        fringe[near] = True
    new_uv = _projects(rng, layout.blocks, tree, areas, open_land, np.where(fringe, 0.2 + radius, 0.0), v.new_uv_share * uv_area,
                       NEW_UV_REACH_M) >= 0

    new_class = cls.copy()
    new_class[demolished] = VACANT
    new_class[redeveloped] = np.where(commercial[redevelop_project[redeveloped]], CLASS_ID["commercial"], CLASS_ID["formal_residential"])
    new_class[new_uv] = UV
    style = layout.block_style.copy()
    style[redeveloped] = rng.uniform(0.2, 1.0, int(redeveloped.sum()))  # new estates are slabs and towers, not walk-ups
    changed = demolished | redeveloped | new_uv
    buildings = _rebuild(rng, params, v, layout, new_class, style, changed)

    fate = np.full(n, OTHER, np.int8)
    fate[is_uv] = PERSISTED
    fate[demolished] = DEMOLISHED
    fate[redeveloped] = REDEVELOPED
    fate[new_uv] = NEW_UV
    return replace(layout, block_class=new_class, block_style=style, buildings=buildings), fate


def _projects(rng: np.random.Generator, blocks: np.ndarray, tree: shapely.STRtree, areas: np.ndarray, members: np.ndarray,
              seed_weight: np.ndarray, target_m2: float, reach_m: float) -> np.ndarray:
    """Pick whole ``members`` blocks in clustered projects until their area is as close to ``target_m2`` as whole
    blocks allow; return each block's project number (-1: not picked).

    A project starts at a member drawn by ``seed_weight`` (zero: never a start) and takes free members within
    ``reach_m`` of it, nearest first; a block that would move the total away from the target is passed over for
    good (the total only grows). Clusters, not salt-and-pepper: real renewal takes neighbouring villages together.
    """
    project = np.full(len(blocks), -1, np.int64)
    free = members.astype(bool).copy()
    weight = np.where(free, seed_weight, 0.0)
    total, k = 0.0, 0
    while target_m2 - total > 0:
        w = np.where(free, weight, 0.0)
        if w.sum() <= 0:
            break
        seed = int(rng.choice(len(blocks), p=w / w.sum()))
        near = tree.query(blocks[seed], predicate="dwithin", distance=reach_m)
        near = near[free[near]]
        near = near[np.argsort(shapely.distance(blocks[seed], blocks[near]), kind="stable")]
        took = False
        for i in near.tolist():
            if abs(total + areas[i] - target_m2) < abs(total - target_m2):
                project[i] = k
                total += float(areas[i])
                took = True
            free[i] = False
            if i == seed and not took:
                break  # the start itself does not fit: no project here
        k += int(took)
    return project


def _rebuild(rng: np.random.Generator, params: CityParams, v: VintageConfig, layout: CityLayout, new_class: np.ndarray,
             style: np.ndarray, changed: np.ndarray) -> Buildings:
    """The buildings at the next date: those of unchanged blocks (a share with a new roof colour from their class's
    palette), then the new buildings of changed blocks by their new land use."""
    b = layout.buildings
    stay = np.flatnonzero(~changed[b.block]) if len(b.polygons) else np.zeros(0, np.int64)
    roofs = b.roof_rgb[stay].copy()
    recolour = rng.random(len(stay)) < v.roof_recolour_share
    owner = layout.block_class[b.block[stay]]
    for name, palette in ROOF_PALETTES.items():
        sel = recolour & (owner == CLASS_ID[name])
        roofs[sel] = palette[rng.integers(len(palette), size=int(sel.sum()))] + rng.normal(0, 8, size=(int(sel.sum()), 3))
    where = np.flatnonzero(changed)
    new, _ = draw_buildings(rng, params, layout.blocks[where], new_class[where], layout.block_angle_rad[where], style[where])
    return Buildings(
        polygons=np.concatenate([b.polygons[stay], new.polygons]).astype(object),
        height_m=np.concatenate([b.height_m[stay], new.height_m]),
        levels=np.concatenate([b.levels[stay], new.levels]).astype(np.int64),
        block=np.concatenate([b.block[stay], where[new.block]]).astype(np.int64),
        roof_rgb=np.concatenate([roofs, new.roof_rgb]).astype(np.float32),
    )


# --- OSM -------------------------------------------------------------------------------------------------------
def update_osm(prev: OsmDraw, prev_serial: np.ndarray, next_serial: int, layout: CityLayout, params: CityParams, touched: np.ndarray,
               v: VintageConfig, rng: np.random.Generator) -> tuple[OsmDraw, np.ndarray, np.ndarray, dict]:
    """The later date's OSM from the earlier's, as OSM's history goes.

    - Mappers update a block whose land use changed (``touched``: changed now or left stale before) with chance
      ``1 - osm_stale_share``: its earlier features go and it is mapped as it now stands (at the later date's
      completeness); otherwise its earlier features and tags stay, stale (a demolished village still
      ``landuse=residential``, ``place=village``).
    - On unchanged ground mapping grows: a draw at completeness ``osm_growth`` adds the roads, landuse polygons and
      buildings the earlier OSM lacked, a village node where a village block had none, and all its POIs (shops
      opened and mapped since: POIs grow by about ``osm_growth`` / the earlier completeness).
    - Features keep their serial number (so their ``osm_id``) from date to date; new ones take numbers from
      ``next_serial`` on.

    Returns the OSM, its serials, the mask of blocks still stale, and counts for ``meta.json``.
    """
    n = len(layout.blocks)
    updated = touched & (rng.random(n) >= v.osm_stale_share)
    stale = touched & ~updated
    keep = np.array([k[1] < 0 or not updated[k[1]] for k in prev.keys], bool)
    geoms, kinds, tags, keys = [prev.geometry[keep]], [k for k, ok in zip(prev.kind, keep) if ok], [t for t, ok in zip(prev.tags, keep) if ok], \
        [k for k, ok in zip(prev.keys, keep) if ok]
    present = set(keys)
    villages = {k[1] for k in keys if k[0] == "place"}

    late = draw_osm(layout, params, rng, blocks=~touched, completeness=v.osm_growth)
    take = np.array([k[0] == "poi" or (k[0] == "place" and k[1] not in villages) or (k[0] != "place" and k not in present) for k in late.keys], bool)
    fresh = draw_osm(layout, params, rng, blocks=updated, roads=False)
    for draw, sel in ((late, take), (fresh, np.ones(len(fresh.keys), bool))):
        geoms.append(draw.geometry[sel] if len(draw.geometry) else draw.geometry)
        kinds += [k for k, ok in zip(draw.kind, sel) if ok]
        tags += [t for t, ok in zip(draw.tags, sel) if ok]
        keys += [k for k, ok in zip(draw.keys, sel) if ok]
    added = int(take.sum()) + len(fresh.keys)
    serial = np.concatenate([prev_serial[keep], np.arange(next_serial, next_serial + added, dtype=np.int64)])
    stats = {"kept": int(keep.sum()), "retired": int((~keep).sum()), "late_mapped": int(take.sum()), "mapped_on_changed_blocks": len(fresh.keys),
             "blocks_updated": int(updated.sum()), "blocks_stale": int(stale.sum()), "completeness": round(params.osm_completeness, 5)}
    return OsmDraw(np.concatenate(geoms), kinds, tags, keys), serial, stale, stats


# --- change truth ----------------------------------------------------------------------------------------------
def change_truth(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Per-pixel UV change between two truth rasters of the same grid: :data:`CHANGE_CODES` (0 UV at neither date,
    1 at both, 2 at the first only, 3 at the last only), :data:`CHANGE_NODATA` where either has no data.

    >>> change_truth(np.array([[2, 2, 3, 0]], np.uint8), np.array([[2, 10, 2, 0]], np.uint8)).tolist()
    [[1, 2, 3, 255]]
    """
    before, after = first == UV, last == UV
    out = np.full(first.shape, CHANGE_CODES["other"], np.uint8)
    out[before & after] = CHANGE_CODES["persistent_uv"]
    out[before & ~after] = CHANGE_CODES["demolished_uv"]
    out[~before & after] = CHANGE_CODES["new_uv"]
    nodata = CLASS_ID["nodata"]
    out[(first == nodata) | (last == nodata)] = CHANGE_NODATA
    return out


def block_fates(first: np.ndarray, last: np.ndarray) -> list[str]:
    """Each block's fate between its first and last class: ``persisted`` (UV at both), ``demolished`` (UV, then
    vacant), ``redeveloped`` (UV, then another use), ``new_uv`` (not UV, then UV) or ``other``."""
    out = np.full(len(first), OTHER, np.int8)
    was, now = first == UV, last == UV
    out[was & now] = PERSISTED
    out[was & ~now & (last == VACANT)] = DEMOLISHED
    out[was & ~now & (last != VACANT)] = REDEVELOPED
    out[~was & now] = NEW_UV
    return [FATES[i] for i in out]


# --- one city at every vintage ---------------------------------------------------------------------------------
@dataclass
class _History:
    """What carries from date to date besides the previous draw: land ever settled by villages, blocks whose OSM is
    stale, the next OSM serial number, every date's block classes."""

    ever_uv: np.ndarray
    stale: np.ndarray
    next_serial: int
    classes: list[np.ndarray]


def generate_city_vintages(spec: CitySpec, cfg: SynthConfig, seed: int, out_dir: str | Path, vintages: Sequence[str]) -> list[dict]:
    """Generate ``spec`` at every vintage under ``out_dir/<city>/<vintage>/`` plus ``change_truth.tif`` and
    ``change_blocks.parquet`` under ``out_dir/<city>/``; return one catalog row per vintage (with ``vintage``).

    Deterministic: the same arguments write the same bytes; the first vintage's files other than ``meta.json`` are
    those :func:`engine.synth.city.generate_city` writes for the same ``(spec, cfg, seed)``.

    Example:
        >>> import tempfile
        >>> rows = generate_city_vintages(CitySpec("wuhan", "Wuhan", "central", 30.59, 114.30), SynthConfig(size_km=0.3), 0,
        ...                               Path(tempfile.mkdtemp()), ("2018", "2024"))
        >>> [(r["vintage"], Path(r["imagery"]).parent.name) for r in rows]
        [('2018', '2018'), ('2024', '2024')]
    """
    names = check_vintages(vintages)
    city_dir = Path(out_dir) / spec.city
    first = draw_city(spec, cfg, seed)
    rows = [{**write_city(city_dir / names[0], spec, seed, first, {"vintage": {"name": names[0], "index": 0, "vintages": list(names)}}),
             "vintage": names[0]}]
    history = _History(first.layout.block_class == UV, np.zeros(len(first.layout.blocks), bool), len(first.osm_serial) + 1,
                       [first.layout.block_class])
    prev = first
    for step, name in enumerate(names[1:], start=1):
        prev, info = _draw_vintage(cfg, first, prev, step, vintage_rng(seed, spec.city, name), history)
        meta = {"vintage": {"name": name, "index": step, "vintages": list(names), "previous": names[step - 1], **info}}
        rows.append({**write_city(city_dir / name, spec, seed, prev, meta), "vintage": name})
    g = first.georef  # every date is on the first date's grid: the later images' misregistration is in their content
    write_raster(city_dir / "change_truth.tif", change_truth(first.scene.truth, prev.scene.truth)[None],
                 Affine.translation(g.east, g.north) @ first.scene.transform, g.crs, nodata=CHANGE_NODATA, resampling="MODE")
    _write_change_blocks(city_dir / "change_blocks.parquet", first, names, history.classes)
    return rows


def _draw_vintage(cfg: SynthConfig, first: CityDraw, prev: CityDraw, step: int, rng: np.random.Generator, history: _History) -> tuple[CityDraw, dict]:
    """The next date of a city from the previous one (``history`` is updated in place); its ``meta.json`` record."""
    params, look, season = draw_acquisition(cfg, prev.params, step, rng)
    layout, fate = evolve_layout(prev.layout, params, cfg.vintage, rng, history.ever_uv)
    scene = render_scene(layout, params, rng, look=look, ground=first.scene.ground)
    changed = layout.block_class != prev.layout.block_class
    osm, serial, stale, osm_stats = update_osm(prev.osm, prev.osm_serial, history.next_serial, layout, params, changed | history.stale,
                                               cfg.vintage, rng)
    g = first.georef
    buildings, kept = buildings_file(layout, params, rng, g.east, g.north)
    history.ever_uv |= layout.block_class == UV
    history.stale = stale
    history.next_serial += len(serial) - osm_stats["kept"]
    history.classes.append(layout.block_class)
    areas = shapely.area(shapely.intersection(layout.blocks, layout.aoi))
    changes = {FATES[f]: {"blocks": int((fate == f).sum()), "area_m2": round(float(areas[fate == f].sum()), 1)} for f in range(1, len(FATES))}
    info = {"look": look.to_json(), **season, "changes": changes, "osm": osm_stats}
    return CityDraw(params, layout, scene, osm, serial, g, buildings, kept), info


def _write_change_blocks(path: Path, first: CityDraw, names: tuple[str, ...], classes: list[np.ndarray]) -> None:
    """``change_blocks.parquet``: one row per block inside the AOI (its polygon clipped to it, EPSG:4326, as in the
    reference) with its class at every vintage (``class_<vintage>``) and its fate from the first to the last."""
    polys, _, ids = reference_polygons(first.layout)
    ids = np.asarray(ids, np.int64)
    blocks = ids >= 0
    ids, polys = ids[blocks], polys[blocks]
    g = first.georef
    to_wgs84 = local_to_wgs84(g.crs, g.east, g.north)
    columns: dict[str, pa.Array] = {"block_id": pa.array(ids, pa.int64())}
    for name, cls in zip(names, classes):
        columns[f"class_{name}"] = pa.array([LANDUSE_CLASSES[int(c)] for c in cls[ids]], pa.string())
    columns["fate"] = pa.array(block_fates(classes[0][ids], classes[-1][ids]), pa.string())
    columns["geometry"] = pa.array(shapely.to_wkb(to_wgs84(polys)), pa.binary())
    write_geoparquet(pa.table(columns), path, WGS84)
