"""OSM as mappers would have drawn a synthetic city: real tag vocabulary, drawn from the land use, imperfectly.

What real OSM gets wrong and this mimics: completeness varies by city and by class (urban-village buildings are
often missing while formal estates are well mapped); roads are mostly present; landuse polygons are sometimes
absent or carry the wrong tag; POIs come in class-dependent mixes (small shops and eateries in villages, banks
and malls downtown, schools on campuses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely

from engine.schema import CLASS_ID
from engine.synth.config import OSM_BUILDING_FACTOR, CityParams
from engine.synth.layout import CityLayout

_NAME = {v: k for k, v in CLASS_ID.items()}

# POI density (per hectare at full completeness) and tag mix per land use: (key, value, weight)
POI_DENSITY_PER_HA: dict[str, float] = {
    "urban_village": 3.0,
    "formal_residential": 0.5,
    "commercial": 4.0,
    "industrial": 0.3,
    "institutional": 0.8,
    "green": 0.3,
    "water": 0.0,
    "farmland": 0.02,
    "vacant": 0.05,
}
POI_MIX: dict[str, list[tuple[str, str, float]]] = {
    "urban_village": [("shop", "convenience", 5), ("amenity", "restaurant", 4), ("amenity", "fast_food", 3), ("shop", "hairdresser", 2),
                      ("shop", "hardware", 1.5), ("shop", "mobile_phone", 1.5), ("amenity", "clinic", 1), ("shop", "kiosk", 1.5),
                      ("amenity", "pharmacy", 1), ("shop", "greengrocer", 1.5), ("amenity", "internet_cafe", 0.5), ("tourism", "guest_house", 0.7),
                      ("amenity", "place_of_worship", 0.3), ("shop", "laundry", 0.8)],
    "formal_residential": [("amenity", "kindergarten", 2), ("leisure", "playground", 2), ("shop", "supermarket", 2), ("amenity", "parking", 2),
                           ("shop", "convenience", 2), ("amenity", "restaurant", 1), ("amenity", "bank", 0.5), ("amenity", "pharmacy", 0.7)],
    "commercial": [("shop", "mall", 1), ("amenity", "bank", 2), ("amenity", "cafe", 3), ("tourism", "hotel", 2), ("office", "company", 3),
                   ("amenity", "restaurant", 4), ("shop", "clothes", 3), ("amenity", "cinema", 0.5), ("amenity", "fast_food", 2),
                   ("shop", "department_store", 0.5), ("amenity", "parking", 1)],
    "industrial": [("man_made", "works", 3), ("office", "company", 2), ("amenity", "fuel", 1), ("shop", "car_repair", 1),
                   ("amenity", "parking", 1), ("landuse", "depot", 0.5)],
    "institutional": [("amenity", "school", 3), ("amenity", "university", 1), ("amenity", "hospital", 1), ("amenity", "library", 1),
                      ("office", "government", 1.5), ("amenity", "police", 0.5), ("leisure", "sports_centre", 1)],
    "green": [("leisure", "playground", 1), ("amenity", "toilets", 1), ("tourism", "viewpoint", 0.5), ("leisure", "pitch", 1),
              ("amenity", "bench", 1.5), ("historic", "memorial", 0.3)],
    "farmland": [("man_made", "water_well", 1), ("amenity", "shelter", 1)],
    "vacant": [("amenity", "parking", 1), ("landuse", "construction", 1)],
}
LANDUSE_TAGS: dict[str, list[tuple[dict[str, str], float]]] = {
    "urban_village": [({"landuse": "residential"}, 6), ({"landuse": "residential", "residential": "rural"}, 2), ({"place": "village"}, 1)],
    "formal_residential": [({"landuse": "residential"}, 8), ({"landuse": "residential", "residential": "urban"}, 2)],
    "commercial": [({"landuse": "commercial"}, 6), ({"landuse": "retail"}, 4)],
    "industrial": [({"landuse": "industrial"}, 9), ({"landuse": "railway"}, 0.5)],
    "institutional": [({"amenity": "school"}, 4), ({"amenity": "university"}, 2), ({"amenity": "hospital"}, 2), ({"landuse": "education"}, 2)],
    "green": [({"leisure": "park"}, 6), ({"landuse": "grass"}, 3), ({"landuse": "forest"}, 1)],
    "water": [({"natural": "water"}, 8), ({"natural": "water", "water": "pond"}, 2)],
    "farmland": [({"landuse": "farmland"}, 8), ({"landuse": "orchard"}, 1), ({"landuse": "greenhouse_horticulture"}, 1)],
    "vacant": [({"landuse": "construction"}, 4), ({"landuse": "brownfield"}, 3), ({"landuse": "greenfield"}, 2)],
}
BUILDING_TAGS: dict[str, list[tuple[str, float]]] = {
    "urban_village": [("yes", 7), ("house", 2), ("residential", 1)],
    "formal_residential": [("apartments", 5), ("residential", 3), ("yes", 2)],
    "commercial": [("commercial", 4), ("retail", 2), ("office", 2), ("yes", 2)],
    "industrial": [("industrial", 5), ("warehouse", 3), ("yes", 2)],
    "institutional": [("school", 3), ("university", 1), ("hospital", 1), ("public", 2), ("yes", 2)],
    "vacant": [("yes", 5), ("shed", 3), ("construction", 2)],
}
# highway classes of mapped roads and their shares: arterials, then local streets (the CO2 truth reads them too)
ARTERIAL_HIGHWAYS: tuple[tuple[str, ...], tuple[float, ...]] = (("primary", "secondary", "trunk"), (0.5, 0.4, 0.1))
LOCAL_HIGHWAYS: tuple[tuple[str, ...], tuple[float, ...]] = (("residential", "tertiary", "unclassified", "service"), (0.5, 0.25, 0.15, 0.1))
VILLAGE_SYLLABLES = "石 牌 沙 河 冼 村 棠 下 岗 头 新 塘 杨 箕 猎 德 林 和 南 北 东 西 上 元 岗 龙 洞 黄 埔 棠".split()
ESTATE_SUFFIX = ["花园", "小区", "家园", "新村", "公寓", "苑"]
ROAD_SUFFIX = ["路", "大道", "街"]


@dataclass(frozen=True)
class OsmDraw:
    """Features in local metres, ready to project: geometry, kind and tags per feature.

    ``keys`` says which real object each feature maps, ``(role, block, detail)``: role ``road`` (detail: family,
    line, part), ``river`` (detail: ``line`` or ``area``), ``landuse``, ``building`` (detail: its footprint's WKB),
    ``place`` or ``poi`` (detail: its number in the block); block -1 for roads and the river. A later vintage's OSM
    (engine.synth.vintage) uses them to keep, retire or add what mappers would have; they are not written.
    """

    geometry: np.ndarray
    kind: list[str]
    tags: list[dict[str, str]]
    keys: list[tuple] = field(default_factory=list)


def draw_osm(layout: CityLayout, params: CityParams, rng: np.random.Generator, *, blocks: np.ndarray | None = None,
             roads: bool = True, completeness: float | None = None) -> OsmDraw:
    """Draw the city's OSM from its layout; ``params.osm_completeness`` scales what gets mapped.

    The keywords draw part of a city's OSM, as a later vintage's mapping does (engine.synth.vintage): ``blocks``
    (a bool mask) limits landuse polygons, buildings and POIs to those blocks, ``roads=False`` leaves out roads and
    the river, ``completeness`` replaces ``params.osm_completeness``. Left at their defaults they change nothing.
    """
    c = params.osm_completeness if completeness is None else completeness
    geoms: list = []
    kinds: list[str] = []
    tags: list[dict[str, str]] = []
    keys: list[tuple] = []

    def add(geom, kind: str, tag: dict[str, str], key: tuple) -> None:
        geoms.append(geom)
        kinds.append(kind)
        tags.append(tag)
        keys.append(key)

    def on(i: int) -> bool:
        return blocks is None or bool(blocks[i])

    aoi = layout.aoi
    # roads: arterials almost always, local streets with the city's completeness
    for i, line in enumerate(shapely.intersection(layout.arterials, aoi) if roads else []):
        if not line.is_empty and rng.random() < 0.97:
            for j, part in enumerate(shapely.get_parts(line)):
                tag = {"highway": str(rng.choice(list(ARTERIAL_HIGHWAYS[0]), p=list(ARTERIAL_HIGHWAYS[1])))}
                if rng.random() < 0.6:
                    tag["name"] = _name(rng, ROAD_SUFFIX)
                if rng.random() < 0.4:
                    tag["lanes"] = str(rng.choice(["4", "6", "8"]))
                if rng.random() < 0.5:
                    tag["surface"] = "asphalt"
                if rng.random() < 0.3:
                    tag["oneway"] = "yes"
                if rng.random() < 0.3:
                    tag["lit"] = "yes"
                add(part, "line", tag, ("road", -1, ("arterial", i, j)))
    for i, line in enumerate(shapely.intersection(layout.local_streets, aoi) if roads else []):
        if not line.is_empty and rng.random() < 0.45 + 0.5 * c:
            for j, part in enumerate(shapely.get_parts(line)):
                tag = {"highway": str(rng.choice(list(LOCAL_HIGHWAYS[0]), p=list(LOCAL_HIGHWAYS[1])))}
                if rng.random() < 0.3:
                    tag["name"] = _name(rng, ROAD_SUFFIX)
                if rng.random() < 0.3:
                    tag["surface"] = str(rng.choice(["asphalt", "concrete", "paved"]))
                add(part, "line", tag, ("road", -1, ("local", i, j)))
    if layout.river is not None and roads:
        if rng.random() < 0.95:
            add(layout.river_line.intersection(aoi), "line", {"waterway": "river", "name": _name(rng, ["河", "江"])}, ("river", -1, "line"))
        if rng.random() < 0.6 + 0.4 * c:
            add(layout.river.intersection(aoi), "polygon", {"natural": "water", "water": "river"}, ("river", -1, "area"))

    # landuse polygons: sometimes absent, sometimes wrong
    for i, (block, cls_id) in enumerate(zip(layout.blocks, layout.block_class)):
        if not on(i):
            continue
        cls = _NAME[int(cls_id)]
        p_mapped = (0.15 + 0.5 * c) if cls == "urban_village" else (0.25 + 0.6 * c)
        if rng.random() >= p_mapped:
            continue
        shown = cls
        if rng.random() < params.wrong_landuse_share:
            shown = str(rng.choice([k for k in LANDUSE_TAGS if k != cls]))
        options, weights = zip(*LANDUSE_TAGS[shown])
        tag = dict(options[rng.choice(len(options), p=np.asarray(weights) / sum(weights))])
        if cls == "urban_village" and rng.random() < 0.5:
            tag["name"] = _village_name(rng)
        elif cls == "formal_residential" and rng.random() < 0.4:
            tag["name"] = _name(rng, ESTATE_SUFFIX)
        add(block.intersection(aoi), "polygon", tag, ("landuse", i, None))

    # buildings: class-dependent completeness; a mapped village usually gets a place node too
    b = layout.buildings
    if len(b.polygons):
        owner_cls = layout.block_class[b.block]
        factor = np.array([OSM_BUILDING_FACTOR.get(_NAME[int(k)], 0.5) for k in owner_cls])
        inside = shapely.within(b.polygons, aoi)
        mapped = (rng.random(len(b.polygons)) < np.clip(c * factor * 1.05, 0, 1)) & inside
        if blocks is not None:
            mapped &= np.asarray(blocks, bool)[b.block]
        levels_known = rng.random(len(b.polygons)) < 0.3
        for j in np.flatnonzero(mapped):
            cls = _NAME[int(owner_cls[j])]
            values, weights = zip(*BUILDING_TAGS.get(cls, [("yes", 1.0)]))
            tag = {"building": str(values[rng.choice(len(values), p=np.asarray(weights) / sum(weights))])}
            if levels_known[j]:
                tag["building:levels"] = str(int(b.levels[j]))
                tag["roof:shape"] = "flat"
            add(b.polygons[j], "polygon", tag, ("building", int(b.block[j]), shapely.to_wkb(b.polygons[j])))

    # POIs: Poisson per block, scaled by completeness, tag mix by land use
    for i, (block, cls_id) in enumerate(zip(layout.blocks, layout.block_class)):
        if not on(i):
            continue
        cls = _NAME[int(cls_id)]
        lam = POI_DENSITY_PER_HA.get(cls, 0.0) * block.area / 1e4 * c
        n = int(rng.poisson(lam))
        if cls == "urban_village" and rng.random() < 0.35 * c:
            add(block.representative_point(), "point", {"place": "village", "name": _village_name(rng)}, ("place", i, None))
        if n == 0:
            continue
        poi_keys, values, weights = zip(*POI_MIX[cls])
        pts = _random_points_in(rng, block.intersection(aoi), n)
        picks = rng.choice(len(poi_keys), size=len(pts), p=np.asarray(weights) / sum(weights))
        for n_poi, (pt, k) in enumerate(zip(pts, picks)):
            tag = {poi_keys[k]: values[k]}
            if rng.random() < 0.5:
                tag["name"] = _name(rng, ["店", "馆", "中心", "行"])
            add(pt, "point", tag, ("poi", i, n_poi))

    geometry = np.array(geoms, dtype=object)
    keep = ~shapely.is_empty(geometry) if len(geometry) else np.zeros(0, bool)
    return OsmDraw(geometry[keep], [k for k, ok in zip(kinds, keep) if ok], [t for t, ok in zip(tags, keep) if ok],
                   [k for k, ok in zip(keys, keep) if ok])


def _random_points_in(rng: np.random.Generator, poly: shapely.Geometry, n: int) -> list:
    if poly.is_empty or n == 0:
        return []
    minx, miny, maxx, maxy = poly.bounds
    shapely.prepare(poly)
    out: list = []
    for _ in range(20):
        x = rng.uniform(minx, maxx, 4 * n)
        y = rng.uniform(miny, maxy, 4 * n)
        ok = shapely.contains_xy(poly, x, y)
        out.extend(shapely.points(x[ok], y[ok]).tolist())
        if len(out) >= n:
            break
    return out[:n]


def _village_name(rng: np.random.Generator) -> str:
    return "".join(rng.choice(VILLAGE_SYLLABLES, size=2)) + "村"


def _name(rng: np.random.Generator, suffixes: list[str]) -> str:
    return "".join(rng.choice(VILLAGE_SYLLABLES, size=2)) + str(rng.choice(suffixes))
