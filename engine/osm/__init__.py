"""OSM features into the contract (EPSG:4326, ``osm_id``, ``kind``, ``tags`` map, WKB ``geometry``)."""

from engine.osm.labels import parse_label_tags, read_label_geojson

__all__ = ["parse_label_tags", "read_label_geojson"]
