import json

import geopandas as gpd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from engine.db import connect
from engine.geoparquet import read_geoparquet_crs, write_geoparquet
from engine.schema import OSM_FEATURES_SCHEMA, SchemaError, check_schema


def _features():
    geoms = [shapely.Point(113.3, 23.1), shapely.LineString([(113.3, 23.1), (113.31, 23.11)]), shapely.box(113.3, 23.1, 113.301, 23.101)]
    return pa.table(
        {
            "osm_id": pa.array([1, 2, 3], pa.int64()),
            "kind": ["point", "line", "polygon"],
            "tags": pa.array([[("shop", "convenience")], [("highway", "residential")], [("building", "yes")]], pa.map_(pa.string(), pa.string())),
            "geometry": pa.array(shapely.to_wkb(geoms), pa.binary()),
        },
        schema=OSM_FEATURES_SCHEMA,
    )


def test_geoparquet_round_trip_keeps_tags_map_and_crs(tmp_path):
    path = write_geoparquet(_features(), tmp_path / "osm.parquet", 4326)
    table = pq.read_table(path)
    assert table.schema.field("tags").type == pa.map_(pa.string(), pa.string())
    assert dict(table["tags"][0].as_py()) == {"shop": "convenience"}
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["columns"]["geometry"]["geometry_types"] == ["LineString", "Point", "Polygon"]
    assert read_geoparquet_crs(path).to_epsg() == 4326
    gdf = gpd.read_parquet(path)
    assert gdf.crs.to_epsg() == 4326 and len(gdf) == 3
    # DuckDB spatial reads the same file directly, geometry typed from the GeoParquet metadata
    con = connect()
    n, kinds = con.execute("SELECT count(*), string_agg(DISTINCT kind, ',' ORDER BY kind) FROM read_parquet(?)", [str(path)]).fetchone()
    assert n == 3 and kinds == "line,point,polygon"
    area = con.execute("SELECT ST_Area(geometry) FROM read_parquet(?) WHERE kind = 'polygon'", [str(path)]).fetchone()[0]
    assert abs(area - 1e-6) < 1e-9


def test_check_schema_names_source_and_field():
    bad = _features().set_column(1, "kind", pa.array([1, 2, 3], pa.int32()))
    try:
        check_schema(bad, OSM_FEATURES_SCHEMA, "city x osm")
    except SchemaError as exc:
        assert "city x osm" in str(exc) and "kind" in str(exc)
    else:
        raise AssertionError("a wrong column type must be rejected")
    assert check_schema(_features(), OSM_FEATURES_SCHEMA, "ok").num_rows == 3
