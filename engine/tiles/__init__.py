"""Tiling: grids in the imagery's pixel grid, OSM assignment to tiles, per-tile graphs and their storage."""
