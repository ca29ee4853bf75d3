"""OSM features into the contract (EPSG:4326, ``osm_id``, ``kind``, ``tags`` map, WKB ``geometry``)."""

from engine.osm.dataset import MANIFEST_NAME, is_osm_dataset, read_manifest, read_osm_dataset
from engine.osm.dataset_writer import DatasetReport, ingest_osm_any, ingest_osm_dataset, writes_dataset
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
from engine.osm.sources import PATH_LIST_SEP, local_sources, osm_source_paths, read_osm_sources

__all__ = [
    "ID_OFFSET",
    "MANIFEST_NAME",
    "PATH_LIST_SEP",
    "DatasetReport",
    "IngestReport",
    "OsmIngestError",
    "decode_osm_id",
    "encode_osm_id",
    "ingest_osm",
    "ingest_osm_any",
    "ingest_osm_dataset",
    "is_area_tags",
    "is_osm_dataset",
    "local_sources",
    "osm_source_paths",
    "parse_label_tags",
    "read_label_geojson",
    "read_manifest",
    "read_osm",
    "read_osm_dataset",
    "read_osm_sources",
    "writes_dataset",
]
