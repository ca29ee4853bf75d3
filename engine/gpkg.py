"""GeoPackage output that is byte-identical when written again from the same rows.

Why: GDAL stamps ``gpkg_contents.last_change`` with the current time, so two writes of the same rows differ and a
rerun's products could not be compared by checksum. GDAL takes that stamp from the ``OGR_CURRENT_DATE`` config
option when it is set; we set it to the time the data describes (the run's start), under a lock because GDAL config
options are process-wide and stitching writes from threads.
"""

from __future__ import annotations

import os
import threading

import geopandas as gpd
import pyogrio

from engine.atomic import atomic_path

EPOCH = "1970-01-01T00:00:00Z"
_LOCK = threading.Lock()


def write_gpkg(gdf: gpd.GeoDataFrame, path: str | os.PathLike[str], layer: str, timestamp: str = "", **kwargs) -> None:
    """Write ``gdf`` as layer ``layer`` of a new GeoPackage at ``path`` (temp + rename), stamped ``timestamp``.

    Args:
        timestamp: ISO 8601 UTC (``2026-12-06T21:26:58Z``), e.g. the run's start; empty: the Unix epoch. The same
            rows and timestamp give the same bytes.
        kwargs: passed to ``GeoDataFrame.to_file`` (e.g. ``geometry_type``).
    """
    stamp = (timestamp or EPOCH).replace("Z", "")
    stamp = stamp if "." in stamp else stamp + ".000"
    with _LOCK, atomic_path(path) as tmp:
        previous = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": stamp + "Z"})
        try:
            gdf.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio", **kwargs)
        finally:
            pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": previous})
