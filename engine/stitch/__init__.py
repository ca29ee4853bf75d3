"""The `stitch` stage: a mapping run's tile predictions -> seamless per-city COGs, UV polygons, statistics.

- :func:`stitch_run` / :class:`StitchConfig` / :class:`CityStitch`: the stage; :class:`StreamingStitch` stitches
  cities while inference still runs (``map`` submits each city when its last tile is committed) (``products/<run>/``, see
  :mod:`engine.stitch.products` for the layout).
- Parts: :mod:`~engine.stitch.inputs` (checked inputs), :mod:`~engine.stitch.blend` (weighted blending in strips),
  :mod:`~engine.stitch.rasters` (COGs), :mod:`~engine.stitch.polygons` (pieces per strip and seam pairs),
  :mod:`~engine.stitch.merge` (DuckDB: one polygon per village, its measures).
"""

from engine.stitch.run import CityStitch, StitchConfig, StreamingStitch, stitch_city, stitch_run

__all__ = ["CityStitch", "StitchConfig", "StreamingStitch", "stitch_city", "stitch_run"]
