"""Knobs of the synthetic city generator and the per-city parameters drawn from them.

`SynthConfig` holds the ranges (what a user tunes); `CityParams` holds one city's draw from those ranges
(what the generator used, written to the city's ``meta.json`` so every synthetic fact is auditable).
docs/synth.md says what each knob mimics in real imagery and OSM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Target share of non-water block area per non-UV land use (a city's draw is a Dirichlet around this).
BASE_LANDUSE_MIX: dict[str, float] = {
    "formal_residential": 0.30,
    "commercial": 0.10,
    "industrial": 0.13,
    "institutional": 0.07,
    "green": 0.13,
    "farmland": 0.12,
    "vacant": 0.08,
}

# How often OSM has a building of each class, relative to the city's completeness (UV buildings often missing).
OSM_BUILDING_FACTOR: dict[str, float] = {
    "urban_village": 0.3,
    "formal_residential": 1.0,
    "commercial": 0.95,
    "industrial": 0.8,
    "institutional": 0.95,
}


@dataclass(frozen=True)
class RegionProfile:
    """How a region's urban villages differ from the national average (the generator's regional truth).

    Attributes:
        uv_prevalence: multiplies the mean UV share of built-up land (``SynthConfig.uv_share_mean``) of the
            region's cities (1 = the national mean).
        uv_density: multiplies the building coverage of UV blocks: fewer empty plots and narrower alleys above 1,
            more open space below.
        uv_size: multiplies the footprint side of UV buildings (and their plot cells).
        uv_floors: the range of floors of UV buildings (whole floors, each about 3 m).
    """

    uv_prevalence: float = 1.0
    uv_density: float = 1.0
    uv_size: float = 1.0
    uv_floors: tuple[int, int] = (2, 4)

    def __post_init__(self) -> None:
        if not 0.0 <= self.uv_prevalence <= 5.0:
            raise ValueError(f"uv_prevalence={self.uv_prevalence}: use 0 to 5 (1 = the national mean)")
        for name in ("uv_density", "uv_size"):
            if not 0.5 <= getattr(self, name) <= 1.5:
                raise ValueError(f"{name}={getattr(self, name)}: use 0.5 to 1.5 (1 = the national average)")
        if len(self.uv_floors) != 2 or not (1 <= self.uv_floors[0] <= self.uv_floors[1] <= 6):
            raise ValueError(f"uv_floors={self.uv_floors!r}: urban villages have 1 to 6 floors (low <= high)")


# Regional urban-village truth, after GeoLink-UV's nationwide findings: UVs are about 8% of built-up land on
# average, clustered in central and south China; low-rise and dense everywhere, tallest and densest in the south
# (the "handshake buildings" of the Pearl River Delta), lowest and most open, on larger plots, in the north.
# The prevalences average about 1 over the 297 cities of cities.csv, so the national mean stays uv_share_mean.
REGION_PROFILES: dict[str, RegionProfile] = {
    "south": RegionProfile(uv_prevalence=1.8, uv_density=1.15, uv_size=0.8, uv_floors=(3, 6)),
    "central": RegionProfile(uv_prevalence=1.6, uv_density=1.05, uv_size=0.95, uv_floors=(2, 5)),
    "southwest": RegionProfile(uv_prevalence=1.0, uv_density=1.0, uv_size=0.95, uv_floors=(2, 5)),
    "east": RegionProfile(uv_prevalence=0.9, uv_density=0.97, uv_size=1.0, uv_floors=(2, 4)),
    "north": RegionProfile(uv_prevalence=0.6, uv_density=0.88, uv_size=1.2, uv_floors=(1, 3)),
    "northwest": RegionProfile(uv_prevalence=0.5, uv_density=0.88, uv_size=1.15, uv_floors=(1, 3)),
    "northeast": RegionProfile(uv_prevalence=0.4, uv_density=0.8, uv_size=1.3, uv_floors=(1, 2)),
}
NEUTRAL_REGION = RegionProfile()
"""The profile of a region not in ``SynthConfig.region_profiles`` (and of every region when they are ``{}``)."""


def _check_range(name: str, rng: tuple[float, float], lo: float, hi: float) -> None:
    if len(rng) != 2 or not (lo <= rng[0] <= rng[1] <= hi):
        raise ValueError(f"{name}={rng!r}: need {lo} <= low <= high <= {hi}")


@dataclass(frozen=True)
class VintageConfig:
    """How a city changes between two vintages (imagery dates) of the same ground; docs/synth.md, "Vintages".

    Rates apply per step, from one vintage to the next. Areas are measured inside the AOI; every choice takes whole
    blocks, as close to its target as whole blocks allow.

    Args:
        demolish_share: share of the earlier date's UV area cleared to construction land (``vacant``).
        redevelop_share: share of the earlier date's UV area rebuilt as formal residential or commercial.
        redevelop_commercial_prob: chance that a redevelopment project is commercial (else formal residential).
        renewal_reach_m: how far a renewal project (demolition or redevelopment) reaches from its first village
            block to take neighbouring village blocks with it: demolitions cluster, as real projects do.
        new_uv_share: new UV area, on vacant, farmland or green blocks at the edge of the built-up area, relative
            to the earlier date's UV area.
        roof_recolour_share: share of the buildings that stand at both dates whose roof changes colour.
        tree_growth: relative growth of vegetation cover (canopies widen: cover x (1 + tree_growth)).
        max_shift_px: largest misregistration of the later image's content (pixels, any direction).
        sensor_offset_dn: largest per-band offset of the later sensor (DN, either sign).
        sensor_crosstalk: largest off-diagonal weight of the later sensor's band mixing (spectral response).
        season_dryness_max: how far vegetation may turn towards dry, leaf-off colours in the later scene's season.
        osm_growth: completeness of the mapping added between the dates on unchanged ground (OSM's history).
        osm_stale_share: chance that mappers have not yet touched a block whose land use changed, so its old
            features and tags stay in the later OSM.
    """

    demolish_share: float = 0.15
    redevelop_share: float = 0.10
    redevelop_commercial_prob: float = 0.3
    renewal_reach_m: float = 150.0
    new_uv_share: float = 0.10
    roof_recolour_share: float = 0.08
    tree_growth: float = 0.15
    max_shift_px: float = 3.0
    sensor_offset_dn: float = 8.0
    sensor_crosstalk: float = 0.05
    season_dryness_max: float = 0.6
    osm_growth: float = 0.35
    osm_stale_share: float = 0.4

    def __post_init__(self) -> None:
        for name in ("demolish_share", "redevelop_share", "redevelop_commercial_prob", "roof_recolour_share",
                     "season_dryness_max", "osm_growth", "osm_stale_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value}: must lie in [0, 1]")
        if self.demolish_share + self.redevelop_share > 1.0:
            raise ValueError(f"demolish_share + redevelop_share = {self.demolish_share + self.redevelop_share}: at most 1 "
                             "(they take the earlier date's village area between them)")
        if not 0.0 <= self.new_uv_share <= 5.0:
            raise ValueError(f"new_uv_share={self.new_uv_share}: use 0 to 5 (relative to the earlier UV area)")
        if not 0.0 <= self.tree_growth <= 2.0:
            raise ValueError(f"tree_growth={self.tree_growth}: use 0 to 2")
        if not 0.0 <= self.max_shift_px <= 20.0:
            raise ValueError(f"max_shift_px={self.max_shift_px}: use 0 to 20 pixels")
        if not 0.0 <= self.renewal_reach_m <= 2000.0:
            raise ValueError(f"renewal_reach_m={self.renewal_reach_m}: use 0 to 2000 m")
        if not 0.0 <= self.sensor_offset_dn <= 40.0:
            raise ValueError(f"sensor_offset_dn={self.sensor_offset_dn}: use 0 to 40 DN")
        if not 0.0 <= self.sensor_crosstalk <= 0.3:
            raise ValueError(f"sensor_crosstalk={self.sensor_crosstalk}: use 0 to 0.3")


@dataclass(frozen=True)
class SynthConfig:
    """Ranges the generator draws each city from.

    Args:
        size_km: side of the square city extent in km (the AOI is an irregular polygon inside it).
        pixel_size_m: range of ground sampling distance; equal bounds fix it (the benchmark uses (1, 1)).
        osm_completeness: range of the city-wide share of real features present in OSM.
        uv_share_mean: mean urban-village share of built-up land across cities.
        uv_share_max: upper bound of that share for any city.
        river_prob: chance a river crosses the city.
        cloud_prob: chance the scene has clouds.
        haze_max: strongest haze (blend weight towards the haze colour).
        wrong_landuse_max: highest share of OSM landuse polygons carrying the wrong tag.
        landuse_concentration: Dirichlet concentration of each city's land-use mix around the base mix; lower
            values give more varied cities.
        region_profiles: per region stratum, how its urban villages differ (:class:`RegionProfile`: prevalence,
            building density, size, floors); ``{}`` makes every region alike.
        buildings_completeness: range of the share of drawn buildings present in each city's buildings file.
        buildings_jitter_m: range of each city's footprint misregistration in the buildings file (metres; each
            footprint moves by up to this much and turns by up to 2 degrees).
        vintage: how a city changes between vintages, when it is drawn at several dates (:class:`VintageConfig`;
            unused for a single date).
    """

    size_km: float = 1.0
    pixel_size_m: tuple[float, float] = (0.5, 1.2)
    osm_completeness: tuple[float, float] = (0.2, 0.95)
    uv_share_mean: float = 0.08
    uv_share_max: float = 0.30
    river_prob: float = 0.35
    cloud_prob: float = 0.2
    haze_max: float = 0.45
    wrong_landuse_max: float = 0.15
    landuse_concentration: float = 25.0
    base_landuse_mix: dict[str, float] = field(default_factory=lambda: dict(BASE_LANDUSE_MIX))
    region_profiles: dict[str, RegionProfile] = field(default_factory=lambda: dict(REGION_PROFILES))
    buildings_completeness: tuple[float, float] = (0.8, 0.99)
    buildings_jitter_m: tuple[float, float] = (0.3, 0.8)
    vintage: VintageConfig = field(default_factory=VintageConfig)

    def __post_init__(self) -> None:
        if not (0.2 <= self.size_km <= 50.0):
            raise ValueError(f"size_km={self.size_km}: use 0.2 to 50 km")
        _check_range("pixel_size_m", self.pixel_size_m, 0.1, 10.0)
        _check_range("osm_completeness", self.osm_completeness, 0.0, 1.0)
        if not (0.0 <= self.uv_share_mean < self.uv_share_max <= 1.0):
            raise ValueError(f"need 0 <= uv_share_mean ({self.uv_share_mean}) < uv_share_max ({self.uv_share_max}) <= 1")
        for name in ("river_prob", "cloud_prob", "haze_max", "wrong_landuse_max"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value}: must lie in [0, 1]")
        unknown = set(self.base_landuse_mix) - set(BASE_LANDUSE_MIX)
        if unknown:
            raise ValueError(f"base_landuse_mix has unknown classes {sorted(unknown)}; known: {sorted(BASE_LANDUSE_MIX)}")
        bad = [k for k, v in self.region_profiles.items() if not isinstance(v, RegionProfile)]
        if bad:
            raise ValueError(f"region_profiles {bad}: each value must be a RegionProfile")
        _check_range("buildings_completeness", self.buildings_completeness, 0.0, 1.0)
        _check_range("buildings_jitter_m", self.buildings_jitter_m, 0.0, 5.0)
        if not isinstance(self.vintage, VintageConfig):
            raise ValueError(f"vintage={self.vintage!r}: must be a VintageConfig")

    def region_profile(self, region: str | None) -> RegionProfile:
        """The profile of ``region`` (the neutral one for an unknown or missing region)."""
        return self.region_profiles.get(region or "", NEUTRAL_REGION)


@dataclass(frozen=True)
class CityParams:
    """One city's draw from :class:`SynthConfig` (all lengths in metres, angles in degrees)."""

    pixel_size_m: float
    grid_angle_deg: float
    arterial_spacing_m: float
    local_spacing_m: tuple[float, float]
    osm_completeness: float
    wrong_landuse_share: float
    uv_share_target: float
    landuse_mix: dict[str, float]
    river: bool
    sun_azimuth_deg: float
    sun_elevation_deg: float
    haze: float
    color_gain: tuple[float, float, float]
    blur_px: float
    noise_dn: float
    cloud_cover: float
    uv_density: float = 1.0
    uv_size: float = 1.0
    uv_floors: tuple[int, int] = (2, 4)
    buildings_completeness: float = 1.0
    buildings_jitter_m: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def draw_city_params(cfg: SynthConfig, rng: np.random.Generator, region: str | None = None) -> CityParams:
    """Draw one city's parameters; every random choice of the city-level knobs happens here.

    ``region`` picks the city's :class:`RegionProfile` (its UV prevalence and UV building morphology); each city
    varies a little around its region's density and size.
    """
    profile = cfg.region_profile(region)
    # UV share of built-up land: Beta with the region's mean (national mean near 8%), clipped to the max.
    mean = min(cfg.uv_share_mean * profile.uv_prevalence, 0.9 * cfg.uv_share_max)
    a = 2.0
    b = a * (1.0 - mean) / max(mean, 1e-6)
    uv_share = float(min(rng.beta(a, b), cfg.uv_share_max)) if mean > 0 else 0.0
    names = list(cfg.base_landuse_mix)
    alpha = np.array([cfg.base_landuse_mix[n] for n in names]) * cfg.landuse_concentration
    mix = rng.dirichlet(alpha)
    clouds = rng.random() < cfg.cloud_prob
    return CityParams(
        pixel_size_m=round(float(rng.uniform(*cfg.pixel_size_m)), 3),
        grid_angle_deg=float(rng.uniform(-25, 25)),
        arterial_spacing_m=float(rng.uniform(380, 650)),
        local_spacing_m=(float(rng.uniform(80, 120)), float(rng.uniform(130, 200))),
        osm_completeness=float(rng.uniform(*cfg.osm_completeness)),
        wrong_landuse_share=float(rng.uniform(0.0, cfg.wrong_landuse_max)),
        uv_share_target=uv_share,
        landuse_mix={n: float(v) for n, v in zip(names, mix)},
        river=bool(rng.random() < cfg.river_prob),
        sun_azimuth_deg=float(rng.uniform(120, 240)),  # the sun stands south-east to south-west at these latitudes
        sun_elevation_deg=float(rng.uniform(30, 70)),
        haze=float(rng.uniform(0.0, cfg.haze_max) ** 1.3 / cfg.haze_max**0.3) if cfg.haze_max > 0 else 0.0,
        color_gain=tuple(float(g) for g in rng.uniform(0.85, 1.15, size=3)),  # type: ignore[arg-type]
        blur_px=float(rng.uniform(0.3, 1.0)),
        noise_dn=float(rng.uniform(1.0, 6.0)),
        cloud_cover=float(rng.uniform(0.04, 0.2)) if clouds else 0.0,
        uv_density=float(np.clip(profile.uv_density * rng.lognormal(0.0, 0.03), 0.5, 1.5)),
        uv_size=float(np.clip(profile.uv_size * rng.lognormal(0.0, 0.04), 0.5, 1.5)),
        uv_floors=(int(profile.uv_floors[0]), int(profile.uv_floors[1])),
        buildings_completeness=float(rng.uniform(*cfg.buildings_completeness)),
        buildings_jitter_m=float(rng.uniform(*cfg.buildings_jitter_m)),
    )
