"""Prepared Parquet parts of a city: tile-index and graph files side by side (same tiles, same order).

Torch-free on purpose: Ray Data read tasks import this, and a worker that does not import torch starts in a
fraction of the time.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.workspace import Workspace


def part_pairs(workspace: Workspace | str | os.PathLike[str], cities: list[str]) -> list[dict]:
    """The prepared Parquet parts of ``cities``: one ``{"index": path, "graphs": path}`` per chunk (same rows, same order)."""
    ws = Workspace.at(workspace)
    out = []
    for city in cities:
        found = storage.list_files(ws.tile_index(city), ".parquet")  # listed in the object store for a remote workspace
        if not found:
            raise FileNotFoundError(f"city {city}: no prepared tiles in {ws.city_tiles(city)}; "
                                    f"run `geolink-engine prepare --cities {city}`")
        for index in found:
            out.append({"index": str(index), "graphs": str(Workspace.graphs_beside(index))})
    return out


def load_part(pair: dict) -> pa.Table:
    """One prepared part as a table: tile-index columns and graph columns side by side (checked: same tiles)."""
    index, graphs = Workspace.fetch(pair["index"]), Workspace.fetch(pair["graphs"])
    return join_graphs(pq.read_table(index), pq.read_table(graphs), f"{pair['index']} and {pair['graphs']}")


def join_graphs(index: pa.Table, graphs: pa.Table, source: str) -> pa.Table:
    """Tile-index rows with their graph columns appended; both must list the same tiles in the same order."""
    if index["tile_id"].to_pylist() != graphs["tile_id"].to_pylist():
        raise ValueError(f"{source} do not hold the same tiles in the same order; rerun prepare --force")
    for name in graphs.column_names:
        if name != "tile_id":
            index = index.append_column(graphs.schema.field(name), graphs[name])
    return index
