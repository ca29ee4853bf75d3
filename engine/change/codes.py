"""The change map's codes, colours and legend (``change.tif``: one uint8 code per pixel, 255 nodata).

| value | name | meaning |
|---|---|---|
| 0 | ``other`` | not UV at either date (both dates mapped) |
| 1 | ``persistent_uv`` | UV at one date or both, with UV of the other date within the misregistration tolerance |
| 2 | ``demolished_uv`` | UV before, no after-UV within the tolerance |
| 3 | ``new_uv`` | UV after, no before-UV within the tolerance |
| 255 | nodata | either date has no data at the pixel (or the after map does not cover it) |

The rule and its trade-off are in :mod:`engine.change.raster`.
"""

from __future__ import annotations

CHANGE_CLASSES: tuple[str, ...] = ("other", "persistent_uv", "demolished_uv", "new_uv")
OTHER, PERSISTENT_UV, DEMOLISHED_UV, NEW_UV = range(4)
CHANGE_CODES: dict[str, int] = {name: i for i, name in enumerate(CHANGE_CLASSES)}
CHANGE_NODATA = 255

# RGB per code (ColorBrewer RdYlBu ends for loss/gain, a warm orange for what stayed, near-white for the rest).
# A GeoTIFF colour table holds RGB only (TIFF ColorMap), so there is no transparency; viewers use the nodata value.
CHANGE_COLOURS: dict[int, tuple[int, int, int]] = {
    OTHER: (240, 240, 240),
    PERSISTENT_UV: (253, 174, 97),
    DEMOLISHED_UV: (215, 25, 28),
    NEW_UV: (43, 131, 186),
}
NODATA_COLOUR = (0, 0, 0)

CHANGE_DESCRIPTIONS: dict[int, str] = {
    OTHER: "not an urban village at either date",
    PERSISTENT_UV: "urban village at both dates (within the misregistration tolerance)",
    DEMOLISHED_UV: "urban village before, gone after",
    NEW_UV: "urban village after, not there before",
}


def colormap() -> dict[int, tuple[int, int, int, int]]:
    """The GDAL colour table of the change COG: all 256 entries (unused ones black), RGBA with alpha 255.

    Example:
        >>> cmap = colormap()
        >>> len(cmap), cmap[DEMOLISHED_UV], cmap[CHANGE_NODATA]
        (256, (215, 25, 28, 255), (0, 0, 0, 255))
    """
    table = {i: (*NODATA_COLOUR, 255) for i in range(256)}
    table.update({code: (*rgb, 255) for code, rgb in CHANGE_COLOURS.items()})
    return table


def hex_colour(rgb: tuple[int, ...]) -> str:
    """``#rrggbb`` of an RGB(A) tuple.

    Example:
        >>> hex_colour((215, 25, 28))
        '#d7191c'
    """
    return "#{:02x}{:02x}{:02x}".format(*rgb[:3])


def legend() -> list[dict]:
    """One entry per code, in code order, for pages and STAC (``classification:classes`` style).

    Keys: ``value``, ``name``, ``colour`` (``#rrggbb``), ``description``; the nodata value is not listed.

    Example:
        >>> [(e["value"], e["name"]) for e in legend()]
        [(0, 'other'), (1, 'persistent_uv'), (2, 'demolished_uv'), (3, 'new_uv')]
    """
    return [{"value": code, "name": name, "colour": hex_colour(CHANGE_COLOURS[code]), "description": CHANGE_DESCRIPTIONS[code]}
            for code, name in enumerate(CHANGE_CLASSES)]
