"""The `stitch` stage's pure core: one city's tile predictions -> seamless COGs, UV polygons, statistics.

- :func:`~engine.stitch.city.stitch_city` / :class:`StitchConfig` / :class:`CityStitch`: one city (no Ray);
  which cities run where, and the run-wide products, are scheduled in :mod:`engine.pipelines.stitch`.
- Parts: :mod:`~engine.stitch.inputs` (checked inputs), :mod:`~engine.stitch.blend` (weighted blending in strips),
  :mod:`~engine.stitch.rasters` (COGs), :mod:`~engine.stitch.polygons` (pieces per strip and seam pairs),
  :mod:`~engine.stitch.merge` (DuckDB: one polygon per village, its measures), :mod:`~engine.stitch.products`
  (the run-wide product files).
"""

from engine.stitch.city import CityStitch, StitchConfig, stitch_city

__all__ = ["CityStitch", "StitchConfig", "stitch_city"]
