"""Urban-village change between two map runs of the same cities ("before", "after"): the pure cores.

- :mod:`~engine.change.codes`: the change map's codes (``other``, ``persistent_uv``, ``demolished_uv``, ``new_uv``;
  255 nodata), colour table and legend.
- :mod:`~engine.change.raster`: :func:`write_change_city`, two class COGs -> one city's ``change.tif`` and its
  areas, tolerant of a few pixels of misregistration between the dates.
- :mod:`~engine.change.fates`: :func:`uv_fates`, the fate of every UV polygon of either date (persisted, shrunk,
  grew, demolished, new), and :func:`fate_counts`.
- :mod:`~engine.change.stats`: :func:`change_stats`, city, region and national rows.

Which cities run where is decided in ``engine.pipelines.change``; nothing here imports Ray.
"""

from engine.change.codes import CHANGE_CLASSES, CHANGE_NODATA, colormap, legend
from engine.change.fates import FATE_COLUMNS, FATES, fate_counts, uv_fates
from engine.change.raster import CHANGE_TIF, change_codes, write_change_city
from engine.change.stats import CHANGE_STATS_COLUMNS, change_stats

__all__ = ["CHANGE_CLASSES", "CHANGE_NODATA", "CHANGE_STATS_COLUMNS", "CHANGE_TIF", "FATES", "FATE_COLUMNS", "change_codes",
           "change_stats", "colormap", "fate_counts", "legend", "uv_fates", "write_change_city"]
