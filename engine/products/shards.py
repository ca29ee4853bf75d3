"""One product set from several map runs over disjoint city shards (`geolink-engine merge-runs`).

Why: beyond about 30,000 tiles/s one map job's driver (its ledger) binds, so a national run is split into map jobs
over city shards (`map --cities <shard> --run national-<k>`, docs/CAPACITY.md). Cities are stitched independently,
so the national products are the shards' products put side by side: the polygons and statistics concatenated,
each city's COGs copied, then the preview page and the STAC collection written for the whole. The result equals
what one map run over all the cities would have written (tested).

Refused, with the runs named: shards made by different models or settings (their pixels would not mean the same),
a city in two shards (which one is right?), and a merged run named like one of its shards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import atomic_path
from engine.product_layout import (
    CITIES_DIR,
    RUN_JSON,
    UV_PARQUET,
    city_folder,
    read_city_stats,
    read_run,
)
from engine.stitch.products import write_city_stats, write_urban_villages
from engine.workspace import Workspace, check_name

# what must agree between shards for their products to be one product
SAME_IN_EVERY_SHARD = ("model_dir", "model_version", "classes", "mode", "tile_size_px", "overlap_px")


def merge_products(workspace: Workspace | str | os.PathLike[str], runs: list[str], into: str, catalog: pa.Table) -> Path:
    """Write ``products/<into>/`` (polygons, statistics, COGs, run.json) from the products of ``runs``, each
    stitched; return the folder (the page and STAC come after: :func:`engine.pipelines.map.merge_runs`).

    ``catalog``: the cities' rows (the statistics follow its order). The folder is built beside its target and
    swapped in whole, so a reader never sees a half-merged product.
    """
    ws = Workspace.at(workspace)
    if len(runs) < 2 or len(set(runs)) != len(runs):
        raise ValueError(f"merge-runs needs two or more distinct runs, got {runs}")
    for name in [*runs, into]:
        check_name("run", name)  # it becomes a folder
    if into in runs:
        raise ValueError(f"the merged run {into!r} must not be one of the runs merged into it")
    sources = {run: ws.fetch(ws.products(run)) for run in runs}
    manifests = {run: read_run(path) for run, path in sources.items()}
    first = runs[0]
    for run in runs[1:]:
        differ = [k for k in SAME_IN_EVERY_SHARD if manifests[run].get(k) != manifests[first].get(k)]
        if differ:
            raise ValueError(f"runs {first!r} and {run!r} differ in {', '.join(differ)}: products of different models or "
                             "settings cannot be merged into one")
    stats = {run: read_city_stats(path) for run, path in sources.items()}
    owner: dict[str, str] = {}
    for run, rows in stats.items():
        for row in rows:
            if row["city"] in owner:
                raise ValueError(f"city {row['city']!r} is in both runs {owner[row['city']]!r} and {run!r}; shards must not overlap")
            owner[row["city"]] = run
    order = {city: i for i, city in enumerate(catalog["city"].to_pylist())}
    rows = sorted((r for rs in stats.values() for r in rs), key=lambda r: (order.get(r["city"], len(order)), r["city"]))

    out = ws.products(into)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for city, run in owner.items():
            src = city_folder(sources[run], city)
            if src.is_dir():
                shutil.copytree(src, city_folder(tmp, city))
        starts = sorted(m["datetime"] for m in manifests.values() if m.get("datetime"))
        write_urban_villages([pq.read_table(path / UV_PARQUET) for path in sources.values()], tmp, starts[0] if starts else "")
        write_city_stats(rows, tmp)
        merged = {**manifests[first], "run": into, "merged_from": list(runs)}
        if starts:
            merged["datetime"] = starts[0]
        (tmp / RUN_JSON).write_text(json.dumps(merged, indent=2, sort_keys=True))
        (tmp / CITIES_DIR).mkdir(exist_ok=True)
    return out
