"""Geospatial primitives: CRS choice and bounds helpers, written once.

Units are in the names: ``_m`` metres, ``_deg`` degrees, ``_px`` pixels.
"""

from __future__ import annotations

from pyproj import CRS, Transformer

WGS84 = CRS.from_epsg(4326)


def utm_epsg_for(lon_deg: float, lat_deg: float) -> int:
    """EPSG code of the WGS84 UTM zone containing a point.

    Formula: zone = floor((lon + 180) / 6) + 1, EPSG 326zz in the northern hemisphere and 327zz in the southern.
    (Norway/Svalbard exceptions are ignored: no city of ours lies there.)

    Example:
        >>> utm_epsg_for(116.40, 39.90)  # Beijing, zone 50N
        32650
    """
    if not (-180.0 <= lon_deg <= 180.0 and -80.0 <= lat_deg <= 84.0):
        raise ValueError(f"({lon_deg}, {lat_deg}) is outside the UTM domain (lon -180..180, lat -80..84)")
    zone = min(int((lon_deg + 180.0) // 6.0) + 1, 60)
    return (32600 if lat_deg >= 0 else 32700) + zone


def lonlat_to_crs(crs: CRS | str | int, lon_deg: float, lat_deg: float) -> tuple[float, float]:
    """Project one WGS84 lon/lat point into ``crs`` (x, y in that CRS's units).

    Example:
        >>> x, y = lonlat_to_crs(32650, 117.0, 0.0)
        >>> round(x)
        500000
    """
    transformer = Transformer.from_crs(WGS84, CRS.from_user_input(crs), always_xy=True)
    return transformer.transform(lon_deg, lat_deg)
