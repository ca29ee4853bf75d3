"""Urban-village change per city, per region and nationally: pure arithmetic over the per-city results.

Input: one dict per city with ``city``, ``region``, optionally ``status`` (only ``done`` cities are measured; other
rows keep their place with every value not measured), the areas of
:func:`engine.change.raster.write_change_city` (``persistent_uv_m2``, ``demolished_uv_m2``, ``new_uv_m2``,
``before_uv_m2``, ``after_uv_m2``) and the polygon counts of :func:`engine.change.fates.fate_counts`
(``polygons_*``). A value a measured city lacks (missing, None or NaN) makes that column not measured for the city
and for every region and nation it belongs to (a partial total would pass for a complete one).

Output rows: the cities in the order given, then the regions (sorted by name), then the nation.

| column | unit | definition |
|---|---|---|
| ``level`` | text | ``city``, ``region`` or ``national`` |
| ``region``, ``city`` | text | the domain; empty where the level is wider |
| ``cities`` | count | cities measured (``status`` ``done``) in the domain |
| ``persistent_uv_m2`` | m² | change map: UV at both dates within the misregistration tolerance (the union of both dates' UV there) |
| ``demolished_uv_m2`` | m² | change map: UV before, none after within the tolerance |
| ``new_uv_m2`` | m² | change map: UV after, none before within the tolerance |
| ``before_uv_m2``, ``after_uv_m2`` | m² | each date's own UV pixel area, on the pixels mapped at both dates |
| ``net_change_m2`` | m² | ``new_uv_m2 - demolished_uv_m2`` |
| ``demolished_share`` | fraction | share of the before-UV land demolished: ``demolished_uv_m2 / before_uv_m2``; NaN when there was none |
| ``new_share`` | fraction | new UV land relative to the before-UV land: ``new_uv_m2 / before_uv_m2`` (can exceed 1) |
| ``net_change_share`` | fraction | ``net_change_m2 / before_uv_m2`` (negative: net loss) |
| ``polygons_before``, ``polygons_after`` | count | UV polygons of each run |
| ``polygons_persisted``, ``polygons_shrunk``, ``polygons_grew``, ``polygons_demolished`` | count | before polygons by fate (they add up to ``polygons_before``) |
| ``polygons_new`` | count | after polygons with no before polygon |

All areas are equal-area m² (EPSG:6933) counted on the change COGs' pixels; the polygon counts come from the fates
(:mod:`engine.change.fates`).

Why the shares divide by ``before_uv_m2`` and not by ``persistent + demolished``: ``persistent_uv`` is the union of
both dates' UV within the tolerance, so it includes the after-only border band that misregistration moves into view
(4-10% of the UV area for a 1-3 px shift on villages 70 px across, tests/test_change_core.py); ``persistent +
demolished`` would overstate the before-UV land by that band and understate the shares. ``before_uv_m2`` is the
before-UV land exactly (its persistent part plus the demolished part).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

AREAS = ("persistent_uv_m2", "demolished_uv_m2", "new_uv_m2", "before_uv_m2", "after_uv_m2")
COUNTS = ("polygons_before", "polygons_after", "polygons_persisted", "polygons_shrunk", "polygons_grew", "polygons_demolished",
          "polygons_new")
DERIVED = ("net_change_m2", "demolished_share", "new_share", "net_change_share")
CHANGE_STATS_COLUMNS = ("level", "region", "city", "cities", "persistent_uv_m2", "demolished_uv_m2", "new_uv_m2", "before_uv_m2",
                        "after_uv_m2", "net_change_m2", "demolished_share", "new_share", "net_change_share", *COUNTS)


def change_stats(rows: Iterable[dict]) -> list[dict]:
    """City, region and national change rows (:data:`CHANGE_STATS_COLUMNS`, definitions in the module docstring).

    Example:
        >>> rows = change_stats([
        ...     {"city": "a", "region": "r", "persistent_uv_m2": 82.0, "demolished_uv_m2": 20.0, "new_uv_m2": 5.0,
        ...      "before_uv_m2": 100.0},
        ...     {"city": "b", "region": "r", "persistent_uv_m2": 103.0, "demolished_uv_m2": 0.0, "new_uv_m2": 10.0,
        ...      "before_uv_m2": 100.0}])
        >>> [(r["level"], r["demolished_share"], r["net_change_m2"]) for r in rows]
        [('city', 0.2, -15.0), ('city', 0.0, 10.0), ('region', 0.1, -5.0), ('national', 0.1, -5.0)]
    """
    rows = list(rows)
    for i, row in enumerate(rows):
        if not row.get("city"):
            raise ValueError(f"change row {i}: no city")
    cities = [(_city_row(row), _measured(row)) for row in rows]
    out = [row for row, _ in cities]
    for region in sorted({row["region"] for row, _ in cities}):
        out.append(_domain("region", region, [row for row, ok in cities if ok and row["region"] == region]))
    out.append(_domain("national", "", [row for row, ok in cities if ok]))
    return out


def _measured(row: dict) -> bool:
    return (row.get("status") or "done") == "done"


def _value(row: dict, key: str):
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _city_row(row: dict) -> dict:
    measured = _measured(row)
    out = {"level": "city", "region": row.get("region") or "", "city": row["city"], "cities": int(measured)}
    for key in AREAS:
        value = _value(row, key) if measured else None
        out[key] = math.nan if value is None else float(value)
    for key in COUNTS:
        value = _value(row, key) if measured else None
        out[key] = None if value is None else int(value)
    return _derive(out)


def _domain(level: str, region: str, members: list[dict]) -> dict:
    """Sums over the measured cities ``members``; a value unmeasured in one of them is unmeasured for the domain."""
    out = {"level": level, "region": region, "city": "", "cities": len(members)}
    for key in AREAS:
        values = [m[key] for m in members]
        out[key] = math.nan if any(math.isnan(v) for v in values) else float(math.fsum(values))
    for key in COUNTS:
        values = [m[key] for m in members]
        out[key] = None if any(v is None for v in values) else int(sum(values))
    return _derive(out)


def _derive(row: dict) -> dict:
    """Net change and shares from the sums (NaN propagates; shares NaN where there was no before-UV land)."""
    demolished, new, before = row["demolished_uv_m2"], row["new_uv_m2"], row["before_uv_m2"]
    row["net_change_m2"] = new - demolished
    row["demolished_share"] = demolished / before if before > 0 else math.nan
    row["new_share"] = new / before if before > 0 else math.nan
    row["net_change_share"] = row["net_change_m2"] / before if before > 0 else math.nan
    return {key: row[key] for key in CHANGE_STATS_COLUMNS}
