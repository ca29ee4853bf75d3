"""Tile graphs to and from Parquet rows (:data:`engine.schema.TILE_GRAPH_SCHEMA`): flat lists, one row per tile.

Row-major flat lists keep the file columnar and small (no nested structs), and a row turns back into a
:class:`~geolink_model.osm_graph.TileGraph` with a few reshapes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from engine.schema import TILE_GRAPH_SCHEMA, edge_column
from geolink_model.osm_graph import EDGE_TYPES, GEOM_FEATURES, GRAPH_VERSION, NODE_TYPES, NodeSet, TileGraph


def graph_hash(graph: TileGraph) -> str:
    """Content hash of a graph (ids, tokens, geometry features, edges): part of each tile's input hash."""
    h = hashlib.blake2b(digest_size=16)
    for kind in NODE_TYPES:
        n = graph.nodes[kind]
        for arr in (n.osm_id, n.tokens, n.geom):
            h.update(np.ascontiguousarray(arr).tobytes())
            h.update(b"|")
    for et in EDGE_TYPES:
        h.update(np.ascontiguousarray(graph.edges[et], np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def graphs_to_table(tile_ids: list[str], graphs: list[TileGraph], tokens_per_node: int) -> pa.Table:
    """Rows of :data:`TILE_GRAPH_SCHEMA` for ``graphs`` (same order as ``tile_ids``)."""
    columns: dict[str, list] = {name: [] for name in TILE_GRAPH_SCHEMA.names}
    for tid, g in zip(tile_ids, graphs):
        columns["tile_id"].append(tid)
        columns["graph_version"].append(GRAPH_VERSION)
        columns["tokens_per_node"].append(tokens_per_node)
        for kind in NODE_TYPES:
            n = g.nodes[kind]
            columns[f"{kind}_osm_id"].append(n.osm_id)
            columns[f"{kind}_tokens"].append(n.tokens.reshape(-1))
            columns[f"{kind}_geom"].append(n.geom.reshape(-1))
        for et in EDGE_TYPES:
            columns[edge_column(et)].append(g.edges[et].reshape(-1).astype(np.int32))
        columns["graph_hash"].append(graph_hash(g))
    arrays = []
    for field in TILE_GRAPH_SCHEMA:
        values = columns[field.name]
        if pa.types.is_list(field.type):
            arrays.append(_list_array(values, field.type))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=TILE_GRAPH_SCHEMA)


def row_to_graph(row: dict) -> TileGraph:
    """A stored row (``table.to_pylist()`` element or a Ray Data row) back to a :class:`TileGraph`."""
    t = int(row["tokens_per_node"])
    nodes = {}
    for kind in NODE_TYPES:
        f = len(GEOM_FEATURES[kind])
        ids = np.asarray(row[f"{kind}_osm_id"], np.int64)
        nodes[kind] = NodeSet(osm_id=ids, tokens=np.asarray(row[f"{kind}_tokens"], np.int32).reshape(len(ids), t),
                              geom=np.asarray(row[f"{kind}_geom"], np.float32).reshape(len(ids), f))
    edges = {et: np.asarray(row[edge_column(et)], np.int64).reshape(2, -1) for et in EDGE_TYPES}
    return TileGraph(nodes=nodes, edges=edges)


def _list_array(values: list[np.ndarray], type_: pa.ListType) -> pa.ListArray:
    lengths = np.array([len(v) for v in values], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, type_.value_type))
