"""Benchmark: synthetic city generation time per km^2 on one core (target: 2 km x 2 km at 1 m in < 10 s).

Usage: python bench/synth.py [--repeats 3]
Pins the process to one core and single-threaded BLAS/GDAL, generates whole cities (layout, rendering, GeoTIFF
and GeoParquet writing) and prints a table; writes bench/results/synth.json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GDAL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402
from engine.synth.city import generate_city  # noqa: E402
from engine.synth.config import SynthConfig  # noqa: E402
from engine.synth.demo import demo_city_specs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cities per setting (different cities, same size)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    settings = [("2 km, 1.0 m", SynthConfig(size_km=2.0, pixel_size_m=(1.0, 1.0))),
                ("2 km, 0.5 m", SynthConfig(size_km=2.0, pixel_size_m=(0.5, 0.5))),
                ("1 km, demo GSD 0.5-1.2 m", SynthConfig(size_km=1.0))]
    specs = demo_city_specs(args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_city(specs[0], SynthConfig(size_km=0.3), 0, Path(tmp) / "warmup")
        for label, cfg in settings:
            times = []
            for spec in specs:
                t0 = time.perf_counter()
                generate_city(spec, cfg, 0, Path(tmp) / label.replace(" ", "_"))
                times.append(time.perf_counter() - t0)
            rows.append((label, cfg.size_km**2, statistics.median(times), max(times)))
    table = Table(title="synthetic city generation, 1 core")
    for col in ("setting", "km^2", "median s/city", "max s/city", "s per km^2"):
        table.add_column(col, justify="right")
    for label, km2, med, worst in rows:
        table.add_row(label, f"{km2:.1f}", f"{med:.2f}", f"{worst:.2f}", f"{med / km2:.2f}")
    Console().print(table)
    head = rows[0]
    metrics = {
        "seconds_per_km2": round(head[2] / head[1], 3),
        "seconds_2km_1m_city_median": round(head[2], 3),
        "seconds_2km_1m_city_max": round(head[3], 3),
        "seconds_per_km2_at_0.5m": round(rows[1][2] / rows[1][1], 3),
        "seconds_per_km2_demo_gsd": round(rows[2][2] / rows[2][1], 3),
    }
    out = write_results("synth", metrics, {"target": "2 km x 2 km at 1 m in < 10 s on one core", "repeats": args.repeats})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
