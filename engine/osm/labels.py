"""GeoJSON whose OSM tags are packed in one ``label`` property (``key:value;key:value``), as in the GeoLink data.

One feature per OSM element; the kind comes from the geometry type, ids are assigned in file order because the
files carry none (negative, so they never collide with real OSM ids).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyogrio
import shapely
from pyproj import CRS

from engine.schema import OSM_FEATURES_SCHEMA

_KIND_BY_TYPE = {"Point": "point", "MultiPoint": "point", "LineString": "line", "MultiLineString": "line",
                 "Polygon": "polygon", "MultiPolygon": "polygon"}


def parse_label_tags(label: str | None) -> dict[str, str]:
    """``"building:yes;name:Main St"`` -> ``{"building": "yes", "name": "Main St"}``.

    Splits pairs on ``;`` and each pair on its first ``:`` (values may contain ``:``, as in ``opening_hours``);
    empty pairs and pairs without a key are dropped.

    Example:
        >>> parse_label_tags("amenity:cafe;opening_hours:Mo-Fr 08:00-17:00;;")
        {'amenity': 'cafe', 'opening_hours': 'Mo-Fr 08:00-17:00'}
    """
    tags: dict[str, str] = {}
    for pair in (label or "").split(";"):
        key, sep, value = pair.partition(":")
        key = key.strip()
        if sep and key:
            tags[key] = value.strip()
    return tags


def read_label_geojson(paths: Sequence[str | os.PathLike[str]]) -> pa.Table:
    """Read label-style GeoJSON files into the OSM feature contract (reprojected to EPSG:4326 when needed).

    Raises:
        ValueError: naming the file, when it has no ``label`` column or holds a geometry type OSM cannot be.
    """
    ids, kinds, tags, wkb = [], [], [], []
    next_id = -1
    for path in paths:
        df = pyogrio.read_dataframe(path)
        if "label" not in df.columns:
            raise ValueError(f"{path}: no 'label' property; expected OSM tags as 'key:value;key:value'")
        if df.crs is not None and not CRS.from_user_input(df.crs).equals(CRS.from_epsg(4326)):
            df = df.to_crs(4326)
        geoms = shapely.make_valid(np.asarray(df.geometry.values, dtype=object))
        for geom, label in zip(geoms, df["label"]):
            if geom is None or geom.is_empty:
                continue
            kind = _KIND_BY_TYPE.get(geom.geom_type)
            if kind is None:
                raise ValueError(f"{path}: geometry type {geom.geom_type} is not an OSM point, line or polygon")
            ids.append(next_id)
            next_id -= 1
            kinds.append(kind)
            tags.append(list(parse_label_tags(label).items()))
            wkb.append(shapely.to_wkb(geom))
    return pa.table(
        {"osm_id": pa.array(ids, pa.int64()), "kind": pa.array(kinds, pa.string()),
         "tags": pa.array(tags, pa.map_(pa.string(), pa.string())), "geometry": pa.array(wkb, pa.binary())},
        schema=OSM_FEATURES_SCHEMA,
    )
