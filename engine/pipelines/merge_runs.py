"""`geolink-engine merge-runs`: one product set from map runs over disjoint city shards."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from engine.pipelines.prepare import prepared_imagery
from engine.pipelines.publish import publish_products
from engine.workspace import Workspace


def merge_runs(workspace: Workspace | str | os.PathLike[str], runs: list[str], into: str, catalog: pa.Table) -> Path:
    """``products/<into>/`` from map runs over disjoint city shards (:mod:`engine.products.shards`), then its preview
    page and STAC collection (published, for a remote workspace); returns the folder."""
    from engine.products.shards import merge_products

    catalog = prepared_imagery(catalog, workspace)  # the rasters prepare read (model VRTs), as `map` saw them
    out = merge_products(Workspace.at(workspace), runs, into, catalog)
    publish_products(out, catalog)
    return out
