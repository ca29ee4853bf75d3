"""Every claim of docs/EXPERIMENTS.md on the held-out benchmark (engine/synth/benchmark.py), 3 seeds, paired per seed.

    python bench/experiments_benchmark.py prepare                 # demo-data --benchmark, prepare (128 px), export
    OMP_NUM_THREADS=1 python bench/experiments_benchmark.py run   # resumable; run two side by side to use 2 cores (~1.5 h)
    python bench/experiments_benchmark.py report                  # JSON + table from the finished jobs

The benchmark: 70 cities (10 per region), 35 of them test cities (5 per region), and a region-held-out split
(``region_split``: central, southwest and northeast held out whole). ``run`` reuses bench/experiments.py's in-process
harness (the engine's model, losses and metrics; its ``train``/``load_data``), one job per (run, seed):

- ``pretrain``: self-supervised, on a capped sample of every city's tiles (the test cities' too: no labels are
  read; EXPERIMENTS.md's 10%-label claim held in that setting);
- ``seg_<mode>`` (fused, image, osm) and ``seg_fused_unguided`` from scratch on the capped training tiles;
- ``seg_fused_10pct_{pretrained,scratch}`` on the 10% subset of them;
- ``reg_<mode>``: population per tile (Rose's protocol, log1p target) fine-tuned from the pretraining;
- ``loc_fused_{with,without}``: fused from scratch on the region split's training tiles, scored on its held-out regions.

Segmentation is scored on every test tile (UV IoU, overall and per region); regression on every test tile with a
target (MAE, RMSE, R2 in persons per tile). Each job writes its result file at once (``<work>/jobs/``) and jobs are
claimed by lock files, so a killed run resumes and two processes share the work. ``report`` (also run after each
job) writes bench/results/experiments_benchmark.json with the per-seed values, the paired differences and a
verdict per claim: holds when the paired difference favours the claim in every seed or its mean exceeds twice its
standard error, fails likewise the other way, else inconclusive (and always inconclusive with fewer than 3 seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("GEOLINK_BENCH_WORK", "/tmp/geolink-bench"))
OUT = RESULTS / "experiments_benchmark.json"
MODES = ("fused", "image", "osm")


# --- prepare (needs the geo stack) ---------------------------------------------------------------------------------
def prepare(work: Path, tile_size: int, per_region: int, size_km: float) -> Path:
    """Write the benchmark (the CLI's ``demo-data --benchmark``), prepare it and export its tiles with the extra
    columns the claims need: region, region_split, tile centre lon/lat, population per tile."""
    ws = work / "ws"
    cli = [str(ROOT / ".venv" / "bin" / "geolink-engine"), "--workspace", str(ws)]
    if not (ws / "catalog.yaml").is_file():
        subprocess.run([*cli, "demo-data", "--benchmark", "--per-region", str(per_region), "--size-km", str(size_km)], check=True)
    subprocess.run([*cli, "prepare", "--tile-size", str(tile_size), "--overlap", "32"], check=True)
    tiles = work / "tiles.parquet"
    from experiments import export

    export(ws, tiles)
    add_columns(ws, tiles)
    return tiles


def add_columns(ws: Path, tiles: Path) -> None:
    from engine.catalog import load_catalog
    from engine.synth.benchmark import load_region_split
    from engine.tiles.parts import load_part, part_pairs
    from engine.training.targets import tile_targets

    catalog = load_catalog(ws / "catalog.yaml").to_pylist()
    region_split = load_region_split(ws / "catalog.yaml")
    extra: dict[str, dict] = {}
    for row in catalog:
        for pair in part_pairs(ws, [row["city"]]):
            part = load_part(pair).select(["tile_id", "region", "lon_min", "lat_min", "lon_max", "lat_max", "minx", "miny", "maxx", "maxy", "crs", "city"])
            rows = part.to_pylist()
            targets = tile_targets(rows, row["population"])
            for r, t in zip(rows, targets):
                extra[r["tile_id"]] = {"region": r["region"], "region_split": region_split[row["city"]],
                                       "lon": (r["lon_min"] + r["lon_max"]) / 2, "lat": (r["lat_min"] + r["lat_max"]) / 2,
                                       "population": t}
    table = pq.read_table(tiles)
    ids = table["tile_id"].to_pylist()
    for name, typ in (("region", pa.string()), ("region_split", pa.string()), ("lon", pa.float64()), ("lat", pa.float64()),
                      ("population", pa.float64())):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array([extra[i][name] for i in ids], typ))
    pq.write_table(table, tiles, compression="zstd")
    print(f"added region, region_split, lon/lat and population to {tiles}")


# --- jobs ----------------------------------------------------------------------------------------------------------
def jobs(seeds: list[int]) -> list[tuple[str, int]]:
    """(run, seed) in the order to run them: a seed at a time, its pretraining first (others depend on it)."""
    names = ["pretrain", "seg_fused", "seg_image", "seg_osm", "seg_fused_unguided", "seg_fused_10pct_scratch",
             "seg_fused_10pct_pretrained", "loc_fused_without", "loc_fused_with", "reg_fused", "reg_image", "reg_osm"]
    return [(n, s) for s in seeds for n in names]


def _claim(lock: Path) -> bool:
    """Take a job's lock (atomic create); a lock whose process is gone is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)
            return False
        except (ValueError, ProcessLookupError, FileNotFoundError):
            lock.unlink(missing_ok=True)
            return _claim(lock)
        except PermissionError:
            return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


class Data:
    def __init__(self, path: Path):
        import torch

        from experiments import load_data

        self.x, self.y, self.graphs, self.split, self.tile_ids = load_data(path, torch.device("cpu"))
        extra = pq.read_table(path, columns=["region", "region_split", "lon", "lat", "population"])
        self.region = np.array(extra["region"].to_pylist())
        self.region_split = np.array(extra["region_split"].to_pylist())
        self.lonlat = torch.as_tensor(np.stack([extra["lon"].to_numpy(), extra["lat"].to_numpy()], axis=1), dtype=torch.float64)
        pop = np.array([np.nan if v is None else v for v in extra["population"].to_pylist()], dtype=np.float64)
        self.population = torch.as_tensor(np.nan_to_num(pop), dtype=torch.float32)
        self.has_target = ~np.isnan(pop)
        self.uv_tile = (self.y == 1).flatten(1).any(dim=1).numpy()


def subsets(d: Data, seed: int, n_train: int, n_pretrain: int, n_loc: int | None = None, n_reg: int | None = None) -> dict[str, np.ndarray]:
    """The tiles of each job for ``seed``: capped training samples (drawn per seed, shared by the paired runs);
    ``n_loc`` / ``n_reg``: the caps of the location and regression runs (default ``n_train``), first tiles of the
    same draws."""
    order = np.random.default_rng(seed).permutation(np.flatnonzero(d.split == "train"))
    train, few = np.sort(order[:n_train]), np.sort(order[: max(2, min(n_train, len(order)) // 10)])  # 10% labels: a subset of the same draw
    reg = np.sort(order[: n_reg or n_train])
    region_train = np.sort(np.random.default_rng(seed).permutation(np.flatnonzero(d.region_split == "train"))[: n_loc or n_train])
    pretrain = np.sort(np.random.default_rng(1000 + seed).permutation(len(d.split))[:n_pretrain])
    return {"train": train, "few": few, "region_train": region_train, "pretrain": pretrain,
            "test": np.flatnonzero(d.split == "test"), "region_test": np.flatnonzero(d.region_split == "test"),
            "reg_train": reg[d.has_target[reg]], "reg_test": np.flatnonzero((d.split == "test") & d.has_target)}


def seg_scores(model, d: Data, idx: np.ndarray, mode: str, lonlat=None, batch: int = 32) -> dict:
    """UV IoU over ``idx`` and per region (one pass; per-region confusion matrices summed)."""
    import torch

    from engine.training.metrics import confusion, scores
    from geolink_model import batch_graphs

    model.eval()
    per: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            b = idx[s:s + batch]
            for region in np.unique(d.region[b]):
                bb = b[d.region[b] == region]
                data = batch_graphs([d.graphs[i] for i in bb])
                logits = model(d.x[bb] if mode != "osm" else None, data, mode, lonlat[bb] if lonlat is not None else None)
                per[region] = per.get(region, 0) + confusion(logits.float(), d.y[bb], 2).numpy()
    model.train()
    iou = lambda m: float(scores(m, ("other", "urban_village"))["iou_urban_village"])  # noqa: E731
    return {"uv_iou": iou(sum(per.values())), "uv_iou_per_region": {r: iou(m) for r, m in sorted(per.items())}}


def reg_scores(model, d: Data, idx: np.ndarray, mode: str, batch: int = 32) -> dict:
    import torch

    from geolink_model import batch_graphs
    from geolink_model.regression import from_model_scale, regression_metrics, regression_sums

    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            b = idx[s:s + batch]
            pred = model(d.x[b] if mode != "osm" else None, batch_graphs([d.graphs[i] for i in b]), mode, None, "regress")
            sums += regression_sums(from_model_scale(pred.float(), True), d.population[b])
    model.train()
    m = regression_metrics(sums)
    return {"mae": float(m["mae"]), "rmse": float(m["rmse"]), "r2": float(m["r2"])}


def run_job(name: str, seed: int, d: Data, args, work: Path) -> dict:
    import torch

    from experiments import train
    from geolink_model import build_model, create_config
    from geolink_model.checkpoint import load_model, save_model

    sub = subsets(d, seed, args.train_tiles, args.pretrain_tiles, args.loc_train_tiles, args.reg_train_tiles)
    size = d.x.shape[-1]
    bundle = work / "pretrained" / f"tiny_seed{seed}_ep{args.pretrain_epochs}_n{args.pretrain_tiles}"
    t0 = time.time()
    torch.manual_seed(seed)
    out: dict = {"run": name, "seed": seed}
    if name == "pretrain":
        history: list = []
        model = train(build_model(create_config("tiny", img_size=size)), d.x, d.y, d.graphs, sub["pretrain"], "pretrain",
                      args.pretrain_epochs, 32, 3e-4, seed, history=history)
        save_model(model, bundle, extra={"history": history, "pretrain_tiles": len(sub["pretrain"])})
        out |= {"tiles": len(sub["pretrain"]), "epochs": args.pretrain_epochs, "loss_first": history[0], "loss_last": history[-1]}
    elif name.startswith("seg_") or name.startswith("loc_"):
        guided = not name.endswith("_unguided")
        with_location = name == "loc_fused_with"
        mode = name.split("_")[1]
        idx = sub["few"] if "10pct" in name else sub["region_train"] if name.startswith("loc_") else sub["train"]
        cfg = create_config("tiny", img_size=size, position_guided=guided, with_location=with_location)
        model = build_model(cfg)
        if name.endswith("_pretrained"):
            pre, _ = load_model(bundle)
            model.load_state_dict(pre.state_dict())
        lonlat = d.lonlat if with_location else None
        epochs = args.few_epochs if "10pct" in name else args.epochs
        train(model, d.x, d.y, d.graphs, idx, "finetune", epochs, 16, 5e-4, seed, mode=mode, lonlat=lonlat)
        test = sub["region_test"] if name.startswith("loc_") else sub["test"]
        out |= {"train_tiles": len(idx), "epochs": epochs, "test_tiles": len(test), **seg_scores(model, d, test, mode, lonlat)}
    elif name.startswith("reg_"):
        mode = name.split("_")[1]
        pre, _ = load_model(bundle)
        model = build_model(create_config("tiny", img_size=size, regression_targets=1))
        missing = model.load_state_dict(pre.state_dict(), strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        train(model, d.x, d.y, d.graphs, sub["reg_train"], "regress", args.reg_epochs, 16, 5e-4, seed, mode=mode, targets=d.population)
        mean = float(d.population[sub["reg_train"]].mean())
        base = d.population[sub["reg_test"]].double() - mean
        out |= {"train_tiles": len(sub["reg_train"]), "epochs": args.reg_epochs, "test_tiles": len(sub["reg_test"]),
                "train_mean_mae": float(base.abs().mean()), **reg_scores(model, d, sub["reg_test"], mode)}
    else:
        raise ValueError(name)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    done_dir, lock_dir = work / "jobs", work / "locks"
    done_dir.mkdir(parents=True, exist_ok=True)
    d = Data(work / "tiles.parquet")
    print(f"{len(d.split)} tiles loaded ({time.strftime('%H:%M:%S')})", flush=True)
    todo = [(n, s) for n, s in jobs(args.seeds) if not args.only or n in args.only]
    while True:
        ran = False
        pending = [(n, s) for n, s in todo if not (done_dir / f"{n}_seed{s}.json").is_file()]
        if not pending:
            break
        for name, seed in pending:
            needs_pre = name == "seg_fused_10pct_pretrained" or name.startswith("reg_")
            if needs_pre and not (done_dir / f"pretrain_seed{seed}.json").is_file():
                continue
            lock = lock_dir / f"{name}_seed{seed}"
            if (done_dir / f"{name}_seed{seed}.json").is_file() or not _claim(lock):
                continue
            try:
                result = run_job(name, seed, d, args, work)
                (done_dir / f"{name}_seed{seed}.json").write_text(json.dumps(result, indent=1))
                print(json.dumps({k: v for k, v in result.items() if k != "uv_iou_per_region"}), f"({time.strftime('%H:%M:%S')})", flush=True)
            finally:
                lock.unlink(missing_ok=True)
            report(work, args)
            ran = True
            break
        if not ran:  # everything left waits on a pretraining another process is running
            time.sleep(20)
    report(work, args)


# --- report --------------------------------------------------------------------------------------------------------
def verdict(diffs: list[float], n_seeds_wanted: int = 3) -> str:
    if len(diffs) < n_seeds_wanted:
        return "inconclusive"
    d = np.array(diffs)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
    if (d > 0).all() or d.mean() > 2 * se:
        return "holds"
    if (d < 0).all() or d.mean() < -2 * se:
        return "fails"
    return "inconclusive"


def _stat(values: dict[str, float]) -> dict:
    v = list(values.values())
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v),
            "seeds": dict(sorted(values.items()))}


def _paired(a: dict[str, float], b: dict[str, float]) -> dict:
    """a - b per seed present in both, with its mean, standard error and sign count."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
    return {"seeds": dict(zip(seeds, diffs)), "mean": float(np.mean(diffs)) if diffs else None, "se": se,
            "favours": sum(x > 0 for x in diffs), "of": len(diffs), "verdict": verdict(diffs),
            **({"note": f"only {len(diffs)} of 3 seeds finished"} if len(diffs) < 3 else {})}


def report(work: Path, args=None) -> dict:
    files = sorted((work / "jobs").glob("*.json"))
    rows = [json.loads(p.read_text()) for p in files]
    # wall clock of the whole run (all processes): from the first job's start to the last job's end (file times)
    ends = [p.stat().st_mtime for p in files]
    wall = {"first_job_started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(min(e - r["seconds"] for e, r in zip(ends, rows)))),
            "last_job_finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(max(ends))),
            "minutes": round((max(ends) - min(e - r["seconds"] for e, r in zip(ends, rows))) / 60, 1)} if rows else None
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["run"], {})[str(r["seed"])] = r
    val = lambda run, key: {s: r[key] for s, r in by.get(run, {}).items()}  # noqa: E731
    metrics: dict = {"uv_iou_test": {n: _stat(val(n, "uv_iou")) for n in by if n.startswith("seg_")},
                     "uv_iou_region_held_out": {n: _stat(val(n, "uv_iou")) for n in by if n.startswith("loc_")},
                     "population_test": {n: {k: _stat(val(n, k)) for k in ("mae", "rmse", "r2", "train_mean_mae")} for n in by if n.startswith("reg_")}}
    claims: dict = {}
    singles = {m: metrics["uv_iou_test"].get(f"seg_{m}") for m in ("image", "osm")}
    if all(singles.values()) and "seg_fused" in by:
        best = max(singles, key=lambda m: singles[m]["mean"])
        claims["fused_beats_best_single_modality"] = {"compare": f"seg_fused - seg_{best} (UV IoU, test split)",
                                                      **_paired(val("seg_fused", "uv_iou"), val(f"seg_{best}", "uv_iou"))}
    if "seg_fused_10pct_pretrained" in by and "seg_fused_10pct_scratch" in by:
        claims["pretrained_beats_scratch_10pct"] = {"compare": "seg_fused_10pct_pretrained - seg_fused_10pct_scratch (UV IoU, test split)",
                                                    **_paired(val("seg_fused_10pct_pretrained", "uv_iou"), val("seg_fused_10pct_scratch", "uv_iou"))}
    if "seg_fused" in by and "seg_fused_unguided" in by:
        claims["position_guidance_helps"] = {"compare": "seg_fused - seg_fused_unguided (UV IoU, test split)",
                                             **_paired(val("seg_fused", "uv_iou"), val("seg_fused_unguided", "uv_iou"))}
    regs = {m: metrics["population_test"].get(f"reg_{m}") for m in ("image", "osm")}
    if all(regs.values()) and "reg_fused" in by:
        best = min(regs, key=lambda m: regs[m]["mae"]["mean"])
        claims["population_fused_beats_best_single_modality"] = {
            "compare": f"MAE(reg_{best}) - MAE(reg_fused) (persons per tile, test split; > 0 favours fused)",
            **_paired(val(f"reg_{best}", "mae"), val("reg_fused", "mae"))}
        claims["population_osm_beats_image"] = {"compare": "MAE(reg_image) - MAE(reg_osm) (> 0 favours osm)",
                                                **_paired(val("reg_image", "mae"), val("reg_osm", "mae"))}
        claims["population_fused_r2_positive"] = {"compare": "R2(reg_fused) - 0 (R2 > 0: better than the test tiles' own mean)",
                                                          **_paired(val("reg_fused", "r2"), {s: 0.0 for s in val("reg_fused", "r2")})}
    if "loc_fused_with" in by and "loc_fused_without" in by:
        claims["location_helps_on_held_out_regions"] = {"compare": "loc_fused_with - loc_fused_without (UV IoU, region_split test)",
                                                        **_paired(val("loc_fused_with", "uv_iou"), val("loc_fused_without", "uv_iou"))}
    metrics["claims"] = claims
    metrics["verdict_rule"] = ("holds: the paired difference favours the claim in every seed, or its mean exceeds 2 standard errors; "
                               "fails: likewise the other way; else inconclusive (always with fewer than 3 seeds)")
    size = json.loads((work / "size.json").read_text()) if (work / "size.json").is_file() else None
    seconds = sum(r["seconds"] for r in rows)
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "metrics": metrics, "benchmark": size,
           "recipe": {k: getattr(args, k) for k in ("train_tiles", "loc_train_tiles", "reg_train_tiles", "pretrain_tiles", "epochs", "few_epochs", "pretrain_epochs", "reg_epochs", "threads")}
           if args is not None and hasattr(args, "train_tiles") else None,
           "job_seconds_total": round(seconds, 1), "wall_clock_utc": wall, "runs": rows}
    if OUT.is_file():  # what a bare `report` cannot know: the recipe of the run and the budget notes
        old = json.loads(OUT.read_text())
        doc["recipe"] = doc["recipe"] or old.get("recipe")
        if "budget" in old:
            doc["budget"] = old["budget"]
    tmp = OUT.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(OUT)
    return doc


def size_report(work: Path) -> dict:
    """Cities and tiles per split and region, UV tiles (tiles with any urban-village pixel) per split."""
    import yaml

    cities = yaml.safe_load((work / "ws" / "catalog.yaml").read_text())["cities"]
    t = pq.read_table(work / "tiles.parquet", columns=["split", "region_split", "region", "label_png", "population"])
    from io import BytesIO

    from PIL import Image

    uv = np.array([bool((np.asarray(Image.open(BytesIO(b))) == 1).any()) for b in t["label_png"].to_pylist()])
    split, rsplit, region = (np.array(t[c].to_pylist()) for c in ("split", "region_split", "region"))
    out: dict = {"cities": len(cities), "tiles": len(split)}
    for col, arr in (("split", split), ("region_split", rsplit)):
        out[col] = {}
        for s in sorted(set(arr)):
            out[col][s] = {"cities": sum(c.get(col) == s for c in cities), "tiles": int((arr == s).sum()), "uv_tiles": int(uv[arr == s].sum()),
                           "regions": sorted({c["region"] for c in cities if c.get(col) == s})}
    out["test_per_region"] = {r: {"cities": sum(c["split"] == "test" and c["region"] == r for c in cities),
                                  "tiles": int(((split == "test") & (region == r)).sum()),
                                  "uv_tiles": int(uv[(split == "test") & (region == r)].sum())} for r in sorted(set(region))}
    (work / "size.json").write_text(json.dumps(out, indent=1))
    return out


def table(doc: dict) -> str:
    m = doc["metrics"]
    lines = ["| run | metric | mean +- std | seeds |", "|---|---|---|---|"]
    fmt = lambda s: " / ".join(f"{v:.3f}" for v in s["seeds"].values())  # noqa: E731
    for key, label in (("uv_iou_test", "UV IoU test"), ("uv_iou_region_held_out", "UV IoU held-out regions")):
        for n, s in m[key].items():
            lines.append(f"| {n} | {label} | {s['mean']:.3f} +- {s['std']:.3f} | {fmt(s)} |")
    for n, s in m["population_test"].items():
        for k in ("mae", "rmse", "r2"):
            lines.append(f"| {n} | {k} | {s[k]['mean']:.3f} +- {s[k]['std']:.3f} | {fmt(s[k])} |")
    lines += ["", "| claim | paired difference per seed | mean (SE) | verdict |", "|---|---|---|---|"]
    for n, c in m["claims"].items():
        se = f"{c['se']:.3f}" if c["se"] is not None else "-"
        lines.append(f"| {n} | {' / '.join(f'{v:+.3f}' for v in c['seeds'].values())} | {c['mean']:+.3f} ({se}) | {c['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK, help="workspace, export, pretrainings and job results (never committed)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--tile-size", type=int, default=128)
    p.add_argument("--per-region", type=int, default=10)
    p.add_argument("--size-km", type=float, default=0.8)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--only", nargs="+", default=None, help="only these runs (see jobs())")
    r.add_argument("--train-tiles", type=int, default=512, help="training tiles per fine-tuning (drawn per seed)")
    r.add_argument("--loc-train-tiles", type=int, default=256, help="training tiles of the location runs")
    r.add_argument("--reg-train-tiles", type=int, default=256, help="training tiles of the regression runs")
    r.add_argument("--pretrain-tiles", type=int, default=1024, help="tiles of the pretraining (all cities, no labels)")
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--few-epochs", type=int, default=40, help="epochs of the 10%%-label fine-tunings")
    r.add_argument("--pretrain-epochs", type=int, default=60)
    r.add_argument("--reg-epochs", type=int, default=10)
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.work, args.tile_size, args.per_region, args.size_km)
        print(json.dumps(size_report(args.work), indent=1))
    elif args.cmd == "run":
        run(args)
        print(table(report(args.work, args)))
    else:
        print(table(report(args.work)))


if __name__ == "__main__":
    main()
