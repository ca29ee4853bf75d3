"""OSM features into the contract (EPSG:4326, ``osm_id``, ``kind``, ``tags`` map, WKB ``geometry``)."""

from engine.osm.ingest import (
    ID_OFFSET,
    IngestReport,
    OsmIngestError,
    decode_osm_id,
    encode_osm_id,
    ingest_osm,
    is_area_tags,
    read_osm,
)
from engine.osm.labels import parse_label_tags, read_label_geojson

__all__ = [
    "ID_OFFSET",
    "IngestReport",
    "OsmIngestError",
    "decode_osm_id",
    "encode_osm_id",
    "ingest_osm",
    "is_area_tags",
    "parse_label_tags",
    "read_label_geojson",
    "read_osm",
]
