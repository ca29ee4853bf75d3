"""What a stage tells the user about each city: the report row shared by `map`, `stitch` and the console."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CityReport:
    """Where one city ended: ``ok``, or ``failed`` with the stage and the error."""

    city: str
    region: str
    status: str
    tiles_ok: int = 0
    tiles_failed: int = 0
    polygons: int = 0
    uv_area_m2: float = 0.0
    uv_share: float | None = None
    stage: str = ""
    error: str = ""
