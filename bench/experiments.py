"""The paper's claims on our synthetic cities: modes, pretraining with few labels, position-guided attention.

Two phases, so the compute can run on a GPU machine that lacks the geo stack:

    python bench/experiments.py export --workspace geolink-data --out .expdata/tiles.parquet   # here (prepared demo)
    python bench/experiments.py run --data .expdata/tiles.parquet --out results.json         # anywhere with torch

``export`` packs the prepared tiles of the demo catalog (graph columns, the tile image as PNG, binary UV labels
rasterised from the reference polygons as PNG, the city and its split) into one Parquet file. ``run`` trains in
process with the engine's own model, losses and metrics (the Ray Train loop is tested separately; here the point
is the model), for each seed:

1. pretrain (self-supervised) on every non-test city;
2. fine-tune from it in each mode (fused, image, osm) with all training labels;
3. with 10% of the training tiles labelled: fine-tune from the pretrained model and from scratch;
4. ablation: pretrain + fine-tune (fused) without the position-guided node embedding.

Every fine-tuned model is scored on the held-out test cities and on all cities never fine-tuned on (val, test
and map splits: 25 village tiles against the test cities' 6): UV IoU. Writes JSON with per-seed values and
mean/std per configuration, plus the pretraining loss curves. ``diagnose`` fine-tunes each mode from scratch and
scores it on its training tiles and on every other split (does a mode carry over to new cities?); ``merge``
combines the files of runs made as separate processes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

IMAGE_DROPOUT = 0.5  # `fused_imgdrop`: share of fine-tuning samples whose image is blanked (modality dropout)


# --- export (needs the geo stack) --------------------------------------------------------------------------------
def export(workspace: Path, out: Path) -> None:
    from PIL import Image

    from engine.catalog import load_catalog
    from engine.training.samples import add_pixels, load_part, part_pairs

    catalog = load_catalog(workspace / "catalog.yaml").to_pylist()
    tables = []
    for row in catalog:
        for pair in part_pairs(workspace, [row["city"]]):
            part = add_pixels(load_part(pair), {row["city"]: row["reference"]})
            images = np.concatenate([c.to_numpy() for c in part["image"].chunks])
            labels = np.concatenate([c.to_numpy() for c in part["label"].chunks])
            keep = [n for n in part.column_names if n.startswith(("point_", "line_", "polygon_", "edge__")) or n in ("tile_id", "tokens_per_node")]
            part = part.select(keep)
            part = part.append_column("image_png", pa.array([_png(np.transpose(i, (1, 2, 0)), Image) for i in images], pa.binary()))
            part = part.append_column("label_png", pa.array([_png(lab, Image) for lab in labels], pa.binary()))
            part = part.append_column("city", pa.array([row["city"]] * part.num_rows))
            part = part.append_column("split", pa.array([row.get("split") or "train"] * part.num_rows))
            tables.append(part)
    table = pa.concat_tables(tables)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {out}: {table.num_rows} tiles, {out.stat().st_size / 2**20:.1f} MiB")


def _png(array: np.ndarray, Image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --- run (torch + PyG + shapely only) ------------------------------------------------------------------------------
def load_data(path: Path, device):
    import torch
    from PIL import Image

    from engine.pixels import MEAN, STD
    from engine.tiles.graph_store import row_to_graph

    table = pq.read_table(path)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in table["image_png"].to_pylist()]).transpose(0, 3, 1, 2)
    labels = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in table["label_png"].to_pylist()])
    graph_cols = [n for n in table.column_names if n.startswith(("point_", "line_", "polygon_", "edge__")) or n == "tokens_per_node"]
    graphs = [row_to_graph(r) for r in table.select(graph_cols).to_pylist()]
    x = torch.as_tensor(images, device=device).float().div_(255.0).sub_(MEAN).div_(STD)
    y = torch.as_tensor(labels, device=device).long()
    return x, y, graphs, np.array(table["split"].to_pylist()), table["tile_id"].to_pylist()


def train(model, x, y, graphs, idx, task: str, epochs: int, batch: int, lr: float, seed: int, mode: str = "fused", history=None,
          augment: bool = True, image_dropout: float = 0.0, max_zoom: float = 1.0, backbone_lr_scale: float = 1.0,
          lonlat=None, targets=None):
    """Train ``model`` in place on tiles ``idx``; ``task``: ``pretrain``, ``finetune`` (segmentation) or ``regress``
    (tile-level ``targets``, learnt on log1p). ``lonlat`` (N, 2): tile centres, for a model built ``with_location``."""
    import torch

    from engine.training.augment import drop_images, photometric, zoom
    from engine.training.metrics import segmentation_loss
    from engine.training.schedule import lr_at, param_groups
    from geolink_model import batch_graphs

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(param_groups(model, backbone_lr_scale), lr=lr, weight_decay=0.05)
    # graph batches are collated once (fixed groups of tiles, drawn per seed) and reused every epoch in a new
    # order: collating PyG batches on the CPU, not the GPU, was the bottleneck
    groups = [b for b in np.array_split(idx[torch.randperm(len(idx), generator=g).numpy()], max(1, len(idx) // batch)) if len(b)]
    cached = [(b, batch_graphs([graphs[i] for i in b]).to(x.device)) for b in groups]
    steps_per_epoch = len(cached)
    total, step = steps_per_epoch * epochs, 0
    weights = torch.tensor([1.0, 3.0], device=x.device)
    for epoch in range(epochs):
        sums = {}
        for s in torch.randperm(len(cached), generator=g).tolist():
            b, data = cached[s]
            images, labels, data = zoom(x[b], y[b], data, max_zoom, g)
            images = photometric(images, g) if augment else images
            if task != "pretrain" and mode == "fused":
                images = drop_images(images, image_dropout, g)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, max(1, total // 20), lr) * group["lr_scale"]
            where = lonlat[b] if lonlat is not None else None
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                if task == "pretrain":
                    losses = model(images, data, "pretrain", where)
                    loss = losses["loss"]
                elif task == "regress":
                    from geolink_model.regression import regression_loss

                    pred = model(images if mode != "osm" else None, data, mode, where, "regress")
                    losses = {"loss": regression_loss(pred.float(), targets[b], True)}
                    loss = losses["loss"]
                else:
                    logits = model(images if mode != "osm" else None, data, mode, where)
                    losses = {"loss": segmentation_loss(logits.float(), labels, weights)}
                    loss = losses["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        if history is not None:
            history.append({k: v / steps_per_epoch for k, v in sums.items()})
    return model


def evaluate(model, x, y, graphs, idx, mode: str, batch: int = 32, lonlat=None) -> float:
    import torch

    from engine.training.metrics import confusion, scores
    from geolink_model import batch_graphs

    model.eval()
    matrix = torch.zeros(2, 2, dtype=torch.long, device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        for s in range(0, len(idx), batch):
            b = idx[s:s + batch]
            data = batch_graphs([graphs[i] for i in b]).to(x.device)
            logits = model(x[b] if mode != "osm" else None, data, mode, lonlat[b] if lonlat is not None else None)
            matrix += confusion(logits.float(), y[b], 2)
    model.train()
    return scores(matrix.cpu().numpy(), ("other", "urban_village"))["iou_urban_village"]


def run(data: Path, out: Path, seeds: list[int], preset: str, pre_epochs: int, ft_epochs: int, batch: int, limit: int | None = None,
        variants: tuple[str, ...] = ("guided", "unguided"), image_dropout: float = IMAGE_DROPOUT, ft_batch: int = 16,
        ft_lr: float = 5e-4, only: tuple[str, ...] | None = None, backbone_lr_scale: float = 1.0, few_epochs: int | None = None,
        pretrain_on_test: bool = False, pretrained_dir: Path | None = None) -> None:
    import torch

    from geolink_model import build_model, create_config
    from geolink_model.checkpoint import load_model, save_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, graphs, split, tile_ids = load_data(data, device)
    # pretraining needs no labels, so it may see every city to be mapped; by default the test cities stay unseen
    pre_idx = np.arange(len(split)) if pretrain_on_test else np.flatnonzero(split != "test")
    train_idx = np.flatnonzero(split == "train")
    test_idx = np.flatnonzero(split == "test")
    held_out_idx = np.flatnonzero(split != "train")  # every city never fine-tuned on (pretraining saw the val and map ones)
    few = np.array([i for i in train_idx if zlib.crc32(tile_ids[i].encode()) % 10 == 0])
    if limit:  # smoke runs
        pre_idx, train_idx, test_idx, few = pre_idx[:limit], train_idx[:limit], test_idx[:limit], few[: max(2, limit // 10)]
        held_out_idx = held_out_idx[:limit]
    print(f"{len(x)} tiles: pretrain {len(pre_idx)}, train {len(train_idx)} (10%: {len(few)}), test {len(test_idx)}; "
          f"UV share of test pixels {(y[test_idx] == 1).float().mean().item():.3f}", flush=True)
    results: dict[str, dict[str, float]] = {}
    held_out: dict[str, dict[str, float]] = {}
    curves: dict[str, list] = {}
    summary: dict = {}
    t0 = time.time()
    for seed in seeds:
        for variant in variants:
            guided = variant == "guided"
            torch.manual_seed(seed)
            cfg = create_config(preset, img_size=x.shape[-1], position_guided=guided)
            # a pretraining is the slow part (20+ min per seed on CPU): keep it, so later fine-tunings can reuse it
            bundle = pretrained_dir and pretrained_dir / (f"{preset}_seed{seed}_{variant}_ep{pre_epochs}"
                                                          f"{'_alltiles' if pretrain_on_test else ''}{f'_limit{limit}' if limit else ''}")
            if bundle and (bundle / "model.safetensors").is_file():
                pre, extra = load_model(bundle, device=str(device))
                history = extra["history"]
                print(f"seed {seed}: pretrained weights from {bundle}", flush=True)
            else:
                history = []
                pre = train(build_model(cfg).to(device), x, y, graphs, pre_idx, "pretrain", pre_epochs, batch, 3e-4, seed, history=history)
                if bundle:
                    save_model(pre, bundle, extra={"history": history, "pretrain_tiles": len(pre_idx)})
            curves[f"seed{seed}_{variant}"] = history
            state = {k: v.detach().clone() for k, v in pre.state_dict().items()}
            # (name, training tiles, from the pretrained weights, share of fused samples with the image blanked,
            # backbone lr scale); the probes freeze the backbone: how much do its features alone carry?
            b = backbone_lr_scale
            runs = [("fused", train_idx, True, 0.0, b), ("fused_imgdrop", train_idx, True, image_dropout, b), ("image", train_idx, True, 0.0, b),
                    ("osm", train_idx, True, 0.0, b), ("fused_10pct_pretrained", few, True, 0.0, b), ("fused_10pct_scratch", few, False, 0.0, 1.0),
                    ("fused_10pct_probe_pretrained", few, True, 0.0, 0.0), ("fused_10pct_probe_scratch", few, False, 0.0, 0.0),
                    ] if guided else [("fused_unguided", train_idx, True, 0.0, b)]
            chosen = runs if only is None else [r for name in only for r in runs if r[0] == name]  # in the order asked for
            for name, idx, from_pre, dropout, scale in chosen:
                torch.manual_seed(seed)
                model = build_model(cfg).to(device)
                if from_pre:
                    model.load_state_dict(state)
                mode = name.split("_")[0]
                epochs = few_epochs if few_epochs and idx is few else ft_epochs
                train(model, x, y, graphs, idx, "finetune", epochs, ft_batch, ft_lr, seed, mode=mode, image_dropout=dropout, backbone_lr_scale=scale)
                iou = evaluate(model, x, y, graphs, test_idx, mode)
                results.setdefault(name, {})[str(seed)] = iou
                held_out.setdefault(name, {})[str(seed)] = wide = evaluate(model, x, y, graphs, held_out_idx, mode)
                print(f"seed {seed} {name:<24} test UV IoU {iou:.4f}, all held-out cities {wide:.4f}  ({time.time() - t0:.0f} s)", flush=True)
                recipe = {"finetune_batch_size": ft_batch, "finetune_lr": ft_lr, "backbone_lr_scale": backbone_lr_scale,
                          "finetune_epochs_10pct": few_epochs or ft_epochs, "pretrain_on_test": pretrain_on_test}
                summary = _write(out, results, held_out, curves, device, preset, pre_epochs, ft_epochs, batch, pre_idx, train_idx, few, test_idx,
                                 held_out_idx, t0, image_dropout, recipe)
    for name, s in summary.items():
        print(f"{name:<24} {s['mean']:.4f} +- {s['std']:.4f}")


def diagnose(data: Path, out: Path, modes: list[str], seeds: list[int], zooms: list[float], epochs: int, batch: int, lr: float,
             n_train: int, preset: str = "tiny", augment: bool = True, position_guided: bool = True) -> list[dict]:
    """Does a mode carry over to new cities? Fine-tune from scratch on ``n_train`` training tiles, score UV IoU on
    those tiles and on the cities of each other split (never trained on here; ``held_out``: all of them together,
    25 village tiles in the 12-city demo against 6 in the test cities); once per mode x seed x zoom (1 = off).
    ``position_guided=False`` is the ablation: node tokens enter the fusion without their image-position embedding."""
    import torch

    from geolink_model import build_model, create_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, graphs, split, _ = load_data(data, device)
    held_out = {s: np.flatnonzero(split == s) for s in ("val", "test", "map")}  # cities never trained on here
    held_out["held_out"] = np.flatnonzero(split != "train")
    rows: list[dict] = []
    for mode in modes:
        for seed in seeds:
            fit_idx = np.sort(np.random.default_rng(seed).permutation(np.flatnonzero(split == "train"))[:n_train])
            for max_zoom in zooms:
                t0 = time.time()
                torch.manual_seed(seed)
                model = build_model(create_config(preset, img_size=x.shape[-1], position_guided=position_guided)).to(device)
                train(model, x, y, graphs, fit_idx, "finetune", epochs, batch, lr, seed, mode=mode, max_zoom=max_zoom, augment=augment)
                row = {"mode": mode if position_guided else f"{mode}_unguided", "seed": seed, "max_zoom": max_zoom, "photometric": augment, "epochs": epochs, "train_tiles": len(fit_idx)}
                row |= {f"iou_{name}": evaluate(model, x, y, graphs, idx, mode) for name, idx in {"train": fit_idx, **held_out}.items()}
                rows.append(row | {"seconds": round(time.time() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
                out.write_text(json.dumps(_diagnose_doc(rows, torch.cuda.get_device_name() if device.type == "cuda" else "cpu"), indent=2))
    return rows


def _diagnose_doc(rows: list[dict], machine: str) -> dict:
    """Bench format: UV IoU per ``<mode>_zoom<max_zoom>`` and split (mean, std, seeds), and every run."""
    metrics: dict[str, dict] = {}
    for split in ("train", "test", "held_out"):
        per: dict[str, dict[str, float]] = {}
        for r in rows:
            per.setdefault(f"{r['mode']}_zoom{r['max_zoom']:g}", {})[str(r["seed"])] = r[f"iou_{split}"]
        metrics[f"uv_iou_{split}"] = _summarise(per)
    return {"machine": machine, "date": time.strftime("%Y-%m-%d"), "metrics": metrics, "runs": rows}


def _write(out, results, held_out, curves, device, preset, pre_epochs, ft_epochs, batch, pre_idx, train_idx, few, test_idx, held_out_idx,
           t0, image_dropout, recipe) -> dict:
    """Write the results so far (after every run, so a cut-off run keeps what it finished)."""
    import torch

    summary = _summarise(results)
    doc = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": preset, "pretrain_epochs": pre_epochs,
           "finetune_epochs": ft_epochs, "batch_size": batch, **recipe, "augment": True, "image_dropout": image_dropout,
           "tiles": {"pretrain": len(pre_idx), "train": len(train_idx), "train_10pct": len(few), "test": len(test_idx),
                     "held_out": len(held_out_idx)},
           "uv_iou": summary, "uv_iou_held_out": _summarise(held_out), "pretrain_curves": curves, "seconds": time.time() - t0}
    out.write_text(json.dumps(doc, indent=2))
    return summary


def _summarise(results: dict[str, dict[str, float]]) -> dict:
    """Mean, std and count over seeds per configuration, with the per-seed values (in seed order)."""
    return {name: {"mean": float(np.mean(list(v.values()))), "std": float(np.std(list(v.values()))), "n_seeds": len(v),
                   "seeds": dict(sorted(v.items()))} for name, v in results.items()}


def merge(parts: list[Path], out: Path) -> dict:
    """Combine per-seed result files (seeds run as separate processes, e.g. side by side on one GPU) into one;
    or the files of several ``diagnose`` runs into one."""
    docs = [json.loads(p.read_text()) for p in parts]
    if all("runs" in d for d in docs):  # `diagnose` files
        merged = _diagnose_doc([r for d in docs for r in d["runs"]], docs[0]["machine"])
        out.write_text(json.dumps(merged, indent=2))
        for name, s in merged["metrics"]["uv_iou_held_out"].items():
            print(f"{name:<24} held-out cities {s['mean']:.4f} +- {s['std']:.4f}  (n={s['n_seeds']})")
        return merged
    results: dict[str, dict[str, float]] = {}
    held_out: dict[str, dict[str, float]] = {}
    curves: dict[str, list] = {}
    for doc in docs:
        for key, into in (("uv_iou", results), ("uv_iou_held_out", held_out)):
            for name, s in doc.get(key, {}).items():  # files written before held-out scoring have no uv_iou_held_out
                for seed, value in s["seeds"].items():
                    if seed in into.get(name, {}):
                        raise ValueError(f"seed {seed} of {name!r} appears in more than one of {[str(p) for p in parts]}")
                    into.setdefault(name, {})[seed] = value
        curves.update(doc["pretrain_curves"])
    summary = _summarise(results)
    keep = ("device", "preset", "pretrain_epochs", "finetune_epochs", "batch_size", "finetune_batch_size", "finetune_lr", "augment",
            "image_dropout", "backbone_lr_scale", "finetune_epochs_10pct", "pretrain_on_test", "tiles")
    metrics = {"uv_iou": summary} | ({"uv_iou_held_out": _summarise(held_out)} if held_out else {})
    merged = {"machine": docs[0].get("device"), "date": time.strftime("%Y-%m-%d"), "metrics": metrics}
    merged |= {k: docs[0].get(k) for k in keep} | {"pretrain_curves": curves, "seconds_per_process": [d["seconds"] for d in docs]}
    out.write_text(json.dumps(merged, indent=2))
    for name, s in summary.items():
        print(f"{name:<24} {s['mean']:.4f} +- {s['std']:.4f}  (n={s['n_seeds']})")
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--workspace", type=Path, default=Path("geolink-data"))
    e.add_argument("--out", type=Path, default=Path(".expdata/tiles.parquet"))
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, default=Path(".expdata/tiles.parquet"))
    r.add_argument("--out", type=Path, default=Path("bench/results/experiments.json"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--preset", default="tiny")
    r.add_argument("--pretrain-epochs", type=int, default=160, help="the H100 runs of docs/EXPERIMENTS.md used 40")
    r.add_argument("--finetune-epochs", type=int, default=30)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--finetune-batch-size", type=int, default=16, help="the H100 runs of docs/EXPERIMENTS.md used 32")
    r.add_argument("--finetune-lr", type=float, default=5e-4, help="the H100 runs of docs/EXPERIMENTS.md used 2e-4")
    r.add_argument("--only", nargs="+", default=None, help="run only these fine-tunings (e.g. fused_10pct_pretrained fused_10pct_scratch)")
    r.add_argument("--backbone-lr-scale", type=float, default=1.0, help="fine-tuning from the pretrained weights: backbone lr share")
    r.add_argument("--few-epochs", type=int, default=None, help="epochs of the 10%%-label fine-tunings (default: --finetune-epochs)")
    r.add_argument("--pretrain-on-test", action="store_true", help="pretrain on the test cities' tiles too (no labels are used)")
    r.add_argument("--pretrained-dir", type=Path, default=None,
                   help="keep each pretraining here (safetensors bundle per preset, seed, variant, epochs) and reuse it when present")
    r.add_argument("--limit", type=int, default=None, help="tiles per split (smoke runs)")
    r.add_argument("--image-dropout", type=float, default=IMAGE_DROPOUT, help="share of blanked images in the fused_imgdrop run")
    r.add_argument("--variants", nargs="+", choices=("guided", "unguided"), default=["guided", "unguided"],
                   help="pretrainings to run: with position-guided attention (and its fine-tunings) and/or the ablation")
    d = sub.add_parser("diagnose", help="fine-tune from scratch, score on the training tiles and every other split")
    d.add_argument("--data", type=Path, default=Path(".expdata/tiles.parquet"))
    d.add_argument("--out", type=Path, default=Path("bench/results/experiments_diagnose.json"))
    d.add_argument("--modes", nargs="+", choices=("image", "osm", "fused"), default=["image"])
    d.add_argument("--seeds", type=int, nargs="+", default=[0])
    d.add_argument("--zooms", type=float, nargs="+", default=[1.0, 1.6], help="max zoom per run (1 = no scale augmentation)")
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--train-tiles", type=int, default=160)
    d.add_argument("--no-photometric", action="store_true", help="train without the photometric augmentation")
    d.add_argument("--unguided", action="store_true", help="the ablation: no image-position embedding on the node tokens")
    m = sub.add_parser("merge")
    m.add_argument("parts", type=Path, nargs="+")
    m.add_argument("--out", type=Path, default=Path("bench/results/experiments.json"))
    args = parser.parse_args()
    if args.cmd == "merge":
        merge(args.parts, args.out)
    elif args.cmd == "diagnose":
        diagnose(args.data, args.out, args.modes, args.seeds, args.zooms, args.epochs, args.batch_size, args.lr, args.train_tiles,
                 augment=not args.no_photometric, position_guided=not args.unguided)
    elif args.cmd == "export":
        export(args.workspace, args.out)
    else:
        run(args.data, args.out, args.seeds, args.preset, args.pretrain_epochs, args.finetune_epochs, args.batch_size, args.limit,
            tuple(args.variants), args.image_dropout, args.finetune_batch_size, args.finetune_lr,
            tuple(args.only) if args.only else None, args.backbone_lr_scale, args.few_epochs,
            args.pretrain_on_test, args.pretrained_dir)


if __name__ == "__main__":
    main()
