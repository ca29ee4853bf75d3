"""Benchmark what a killed `map` keeps: the driver is killed (SIGKILL, its whole process group, Ray included) 1 s and
3 s after the first prediction part lands, then the same command is run again.

Usage: python bench/resume.py [--cities 4] [--size-km 1.0] [--kills 1,3]

Per kill: tiles committed in the ledger at the kill, prediction parts on disk, tiles the rerun adopted from parts
that verified (footer record: tiles, rows, checksum) instead of predicting them again, tiles it predicted, and
whether the resumed products (GeoParquet, city stats, every COG) are byte-identical to an uninterrupted run's. ``work_saved_fraction`` = adopted /
(tiles not committed at the kill); ``redo_seconds_saved`` = adopted x the uninterrupted run's inference seconds per
tile. The model is a seeded, untrained ``tiny`` bundle (the cost per tile does not depend on the weights).
Writes bench/results/resume.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402

console = Console()
# compared across runs; the GeoPackage is stamped with its own run's start (byte-identical on a rerun of one run,
# not across two runs started at different times)
PRODUCTS = ("urban_villages.parquet", "city_stats.csv", "cities/*/uv_prob.tif", "cities/*/class.tif")


def cli(ws: Path, *args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "geolink-engine"), "--workspace", str(ws), *args]


def run(cmd: list[str], log: Path) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"}).returncode
    return rc, log.read_text(), time.perf_counter() - t0


def digests(products: Path) -> dict[str, str]:
    return {str(p.relative_to(products)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in PRODUCTS for p in sorted(products.glob(pattern))}


def ledger_rows(run_path: Path) -> int:
    import duckdb

    if not (run_path / "ledger.duckdb").is_file():
        return 0
    con = duckdb.connect(str(run_path / "ledger.duckdb"), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM ledger WHERE status = 'ok'").fetchone()[0]
    finally:
        con.close()


def killed_run(ws: Path, model: Path, run_name: str, delay_s: float, out: Path) -> dict:
    """Start `map`, SIGKILL its process group ``delay_s`` after the first part lands, rerun it; what was kept."""
    run_path = ws / "runs" / run_name
    cmd = cli(ws, "map", "--model", str(model), "--run", run_name, "--batch-size", "8", "--actors", "1")
    with (out / f"{run_name}-killed.log").open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not list((run_path / "predictions").rglob("part-*.parquet")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{run_name}: the run ended before any part landed; see {fh.name}")
            time.sleep(0.05)
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2.0)  # let the orphaned Ray processes of the killed session go
    parts = len(list((run_path / "predictions").rglob("part-*.parquet")))
    committed = ledger_rows(run_path)
    rc, text, seconds = run(cmd, out / f"{run_name}-rerun.log")
    if rc not in (0, 1):
        raise RuntimeError(f"{run_name}: rerun exited {rc}:\n{text[-3000:]}")
    flat = " ".join(text.split())
    found = re.search(r"inference: (\d+) tiles predicted, (\d+) failed, (\d+) done before(?: \((\d+) of them)?", flat)
    predicted, _failed, done, adopted = (int(g or 0) for g in found.groups())
    return {"kill_after_first_part_s": delay_s, "committed_at_kill": committed, "parts_on_disk_at_kill": parts,
            "adopted_tiles": adopted, "predicted_on_rerun": predicted, "done_before_rerun": done, "rerun_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cities", type=int, default=4)
    parser.add_argument("--size-km", type=float, default=1.0)
    parser.add_argument("--kills", default="1,3")
    args = parser.parse_args()

    import torch

    from geolink_model.checkpoint import save_model
    from geolink_model.config import create_config
    from geolink_model.model import build_model

    out = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    ws = out / "ws"
    rc, text, _ = run(cli(ws, "demo-data", "--cities", str(args.cities), "--size-km", str(args.size_km)), out / "demo.log")
    assert rc == 0, text
    torch.manual_seed(0)
    model = save_model(build_model(create_config("tiny", num_classes=2)), out / "model")
    (model / "train_config.json").write_text(json.dumps({"classes": "binary", "mode": "fused", "gsd_range_m": [0.5, 1.2]}))

    rc, text, seconds = run(cli(ws, "map", "--model", str(model), "--run", "clean", "--batch-size", "8", "--actors", "1"), out / "clean.log")
    assert rc == 0, text
    flat = " ".join(text.split())
    tiles = int(re.search(r"inference: (\d+) tiles predicted", flat).group(1))
    infer_s = float(re.search(r"inference ([\d.]+) s", flat).group(1))
    clean = digests(ws / "products" / "clean")

    rows = []
    for k, delay in enumerate(float(v) for v in args.kills.split(",")):
        name = f"killed-{k}"
        row = killed_run(ws, model, name, delay, out)
        lost = tiles - row["committed_at_kill"]
        row["work_saved_fraction"] = round(row["adopted_tiles"] / lost, 3) if lost else None
        row["redo_seconds_saved"] = round(row["adopted_tiles"] * infer_s / tiles, 1)
        row["products_identical_to_clean"] = digests(ws / "products" / name) == clean
        rows.append(row)

    view = Table(title=f"kill -9 of `map` after the first part lands ({tiles} tiles, {infer_s:.1f} s of inference uninterrupted)")
    for col in ("kill at", "committed", "parts", "adopted", "re-predicted", "work saved", "s saved", "same products"):
        view.add_column(col)
    for r in rows:
        view.add_row(f"+{r['kill_after_first_part_s']:g} s", str(r["committed_at_kill"]), str(r["parts_on_disk_at_kill"]),
                     str(r["adopted_tiles"]), str(r["predicted_on_rerun"]),
                     "n/a" if r["work_saved_fraction"] is None else f"{r['work_saved_fraction']:.0%}", f"{r['redo_seconds_saved']:.1f}",
                     str(r["products_identical_to_clean"]))
    console.print(view)
    path = write_results("resume", {"tiles": tiles, "inference_seconds_uninterrupted": round(infer_s, 1), "kills": rows},
                         {"setup": f"{args.cities} demo cities of {args.size_km} km, tiny model (untrained), CPU, batch 8, 1 actor"})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
