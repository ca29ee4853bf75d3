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


def _check_range(name: str, rng: tuple[float, float], lo: float, hi: float) -> None:
    if len(rng) != 2 or not (lo <= rng[0] <= rng[1] <= hi):
        raise ValueError(f"{name}={rng!r}: need {lo} <= low <= high <= {hi}")


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
    """

    size_km: float = 1.0
    pixel_size_m: tuple[float, float] = (0.5, 1.2)
    osm_completeness: tuple[float, float] = (0.2, 0.95)
    uv_share_mean: float = 0.08
    uv_share_max: float = 0.20
    river_prob: float = 0.35
    cloud_prob: float = 0.2
    haze_max: float = 0.45
    wrong_landuse_max: float = 0.15
    landuse_concentration: float = 25.0
    base_landuse_mix: dict[str, float] = field(default_factory=lambda: dict(BASE_LANDUSE_MIX))

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

    def to_json(self) -> dict:
        return asdict(self)


def draw_city_params(cfg: SynthConfig, rng: np.random.Generator) -> CityParams:
    """Draw one city's parameters; every random choice of the city-level knobs happens here."""
    # UV share of built-up land: Beta with the configured mean (about 0-20%, mean near 8%), clipped to the max.
    a = 2.0
    b = a * (1.0 - cfg.uv_share_mean) / max(cfg.uv_share_mean, 1e-6)
    uv_share = float(min(rng.beta(a, b), cfg.uv_share_max)) if cfg.uv_share_mean > 0 else 0.0
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
    )
