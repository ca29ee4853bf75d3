"""UV polygons of each strip, and which of them continue across the strip seams.

Each strip's UV mask is labelled into 4-connected components (``scipy.ndimage.label``) and each component
polygonised (``rasterio.features.shapes`` on the label image, 4-connectivity: one polygon per label). Polygons are
kept in the city's *pixel* coordinates (x = column, y = row, integers), so pieces on both sides of a seam share
exactly the same edge coordinates and the union in :mod:`engine.stitch.merge` is exact; the pixel-to-CRS affine is
applied after merging.

Seam pairs come from the pixels themselves: the last row of a strip and the first row of the next are neighbours,
and two pieces continue into each other exactly where a UV pixel above meets a UV pixel below. That is the same
4-connectivity rule ``shapes`` uses inside a strip, so merging gives what one pass over the whole raster would.
Per piece the pixel count and the sum of UV probability are kept, so ``mean_prob`` is exact after merging.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import shapely
from affine import Affine
from rasterio.features import shapes
from scipy import ndimage

PIECES_SCHEMA = pa.schema([
    pa.field("pid", pa.int64(), nullable=False),  # raster-scan order of each piece's first pixel, strip by strip
    pa.field("pixels", pa.int64(), nullable=False),
    pa.field("prob_sum", pa.float64(), nullable=False),
    pa.field("geometry", pa.binary(), nullable=False),  # WKB polygon in pixel coordinates of the city grid
])


class Pieces:
    """Polygon pieces of a city's UV mask, collected strip by strip, and the seam pairs between them."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []
        self.pairs: list[np.ndarray] = []
        self.count = 0
        self._last_row: np.ndarray | None = None  # piece id per column of the previous strip's last row (-1: not UV)
        self._next_row = 0

    def add_strip(self, row_off: int, uv: np.ndarray, prob: np.ndarray) -> None:
        """Polygonise one strip's UV mask (``uv`` bool (h, W), ``prob`` float p_uv) starting at raster row ``row_off``.

        Strips must arrive top to bottom, each starting where the previous one ended.
        """
        if row_off != self._next_row:
            raise ValueError(f"strip at row {row_off} does not follow the previous one (which ended at row {self._next_row})")
        if not uv.shape[0]:
            return
        labels = np.zeros(uv.shape, np.int32)
        n = ndimage.label(uv, output=labels)
        first = self.count
        if n:
            inside = labels[uv]
            pixels = np.bincount(inside, minlength=n + 1)[1:]
            prob_sum = np.bincount(inside, weights=prob[uv].astype(np.float64), minlength=n + 1)[1:]
            geoms = np.empty(n, dtype=object)
            rows, cols = np.flatnonzero(uv.any(axis=1)), np.flatnonzero(uv.any(axis=0))
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # polygonise only where UV pixels are
            box_labels, box_uv, x0, y0 = labels[box], uv[box], int(cols[0]), row_off + int(rows[0])
            if x0 == 0 and y0 == 0:  # traced in pixel space, the box at the origin would be traced with the identity
                # transform, which GDAL takes for "no georeference" (rasterio warns): one empty pixel above and left
                box_labels, box_uv, x0, y0 = np.pad(box_labels, ((1, 0), (1, 0))), np.pad(box_uv, ((1, 0), (1, 0))), -1, -1
            for geom, value in shapes(box_labels, mask=box_uv, connectivity=4, transform=Affine.translation(x0, y0)):
                geoms[int(value) - 1] = shapely.geometry.shape(geom)
            self.tables.append(pa.table({
                "pid": pa.array(np.arange(first, first + n), pa.int64()),
                "pixels": pa.array(pixels, pa.int64()),
                "prob_sum": pa.array(prob_sum, pa.float64()),
                "geometry": pa.array(shapely.to_wkb(geoms), pa.binary()),
            }, schema=PIECES_SCHEMA))
        top, bottom = (np.where(labels[i] > 0, labels[i].astype(np.int64) - 1 + first, -1) for i in (0, -1))
        if self._last_row is not None:
            both = (self._last_row >= 0) & (top >= 0)
            if both.any():
                self.pairs.append(np.unique(np.stack([self._last_row[both], top[both]], axis=1), axis=0))
        self._last_row, self._next_row = bottom, row_off + uv.shape[0]
        self.count += n

    def table(self) -> pa.Table:
        return pa.concat_tables(self.tables) if self.tables else PIECES_SCHEMA.empty_table()

    def pair_array(self) -> np.ndarray:
        return np.concatenate(self.pairs) if self.pairs else np.zeros((0, 2), np.int64)
