"""Benchmark training throughput: samples/s per worker for pretraining and fine-tuning, and MFU on a GPU.

Usage:
    python bench/train.py                      # CPU, `tiny`, one thread per worker, real demo tiles
    python bench/train.py --device cuda --preset base --batch-size 128   # GPU, bf16 autocast, plus MFU
    python bench/train.py --device cuda --preset base --batch-size 256 --compile --image-only --image-variants --profile
        # the image branch in several configurations (attention kernel, batch, compile mode, weight dtype) and
        # where the GPU time of the best one goes

A "worker" is one training process: on CPU it gets one thread (as a 1-CPU Ray Train worker does). Steps are the
same forward/backward/AdamW steps the Ray Train loop runs. FLOPs per step are counted by
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward), and MFU = counted FLOPs / step time / peak bf16
dense FLOP/s of the device (H100 SXM: 989 TFLOP/s). The image-branch MFU times the ViT encoder alone (patch embed
+ blocks, full 224 px tiles, fine-tuning style), which is where the compute is.

On CPU the batches are real prepared demo tiles (generated and prepared in a temp workspace); with ``--device
cuda`` the graphs are random but sized like demo tiles (so the benchmark needs only torch, timm, PyG and shapely).
Writes bench/results/train.json (CPU) or bench/results/train_gpu.json (GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from geolink_model import batch_graphs, build_model, create_config  # noqa: E402
from geolink_model.osm_graph import EDGE_TYPES, GEOM_FEATURES, NODE_TYPES, NodeSet, TileGraph  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_graph(rng: np.random.Generator, nodes: dict[str, int], edges_per_type: int, tokens: int = 12) -> TileGraph:
    """A tile graph with demo-like sizes and random contents (positions in [0, 1], valid edge indices)."""
    ns = {}
    for t in NODE_TYPES:
        n = nodes[t]
        geom = rng.random((n, len(GEOM_FEATURES[t]))).astype(np.float32)
        tok = rng.integers(1, 1 << 15, size=(n, tokens)).astype(np.int32)
        tok[:, 4:] = 0
        ns[t] = NodeSet(osm_id=np.arange(n, dtype=np.int64), tokens=tok, geom=geom)
    ed = {}
    for s, r, d in EDGE_TYPES:
        if nodes[s] and nodes[d]:
            ed[(s, r, d)] = np.stack([rng.integers(0, nodes[s], edges_per_type), rng.integers(0, nodes[d], edges_per_type)]).astype(np.int64)
        else:
            ed[(s, r, d)] = np.zeros((2, 0), np.int64)
    return TileGraph(nodes=ns, edges=ed)


def real_batches(batch_size: int, n_batches: int):
    """Batches of real demo tiles (generated and prepared here) as the training loop sees them."""
    import tempfile

    import pyarrow as pa

    from engine.catalog import load_catalog
    from engine.synth.config import SynthConfig
    from engine.synth.demo import write_demo
    from engine.tiles.city import PrepareConfig, tile_city
    from engine.training.samples import add_pixels, collate, join_graphs

    tmp = Path(tempfile.mkdtemp())
    write_demo(tmp, 3, SynthConfig(), seed=0, workers=1)
    rows = load_catalog(tmp / "catalog.yaml").to_pylist()
    table = pa.concat_tables([join_graphs(*tile_city(row, PrepareConfig(), tmp / "stage" / row["city"]), row["city"]) for row in rows])
    refs = {r["city"]: r["reference"] for r in rows}
    out = []
    for i in range(n_batches):
        part = table.slice((i * batch_size) % max(1, table.num_rows - batch_size), batch_size)
        out.append(collate(add_pixels(part, refs)))
    return out


def time_steps(model, step, batches, warmup: int, device: torch.device, compile_part=None) -> tuple[float, float]:
    """Mean seconds per step and FLOPs per step (counted once)."""
    from torch.utils.flop_counter import FlopCounterMode

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    counter = FlopCounterMode(display=False)
    with counter:  # counted eagerly, before any compilation (compiled graphs bypass the counter)
        step(model, opt, batches[0])
    flops = float(counter.get_total_flops())
    if compile_part is not None:
        model = compile_part(model)
    for b in batches[:warmup]:
        step(model, opt, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(model, opt, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(1, len(batches) - warmup), flops


def _peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# image-branch configurations tried by --image-variants: (name, batch multiplier, SDPA backends, compile mode,
# parameter dtype: fp32 master weights under bf16 autocast, or bf16 weights, whose residual stream stays bf16)
IMAGE_VARIANTS = (
    ("compiled_sdpa_auto_b1x", 1, None, "default", "fp32"),
    ("compiled_cudnn_attn_b1x", 1, "CUDNN_ATTENTION", "default", "fp32"),
    ("compiled_flash_attn_b2x", 2, "FLASH_ATTENTION", "default", "fp32"),
    ("compiled_cudnn_attn_b2x", 2, "CUDNN_ATTENTION", "default", "fp32"),
    ("compiled_cudnn_attn_b2x_autotune", 2, "CUDNN_ATTENTION", "max-autotune-no-cudagraphs", "fp32"),
    ("compiled_bf16_params_b1x", 1, None, "default", "bf16"),
    ("compiled_bf16_params_b1x_autotune", 1, None, "max-autotune-no-cudagraphs", "bf16"),
)


def image_variants(cfg, image_step, batches, device: torch.device, flops_per_sample: float, only: tuple[str, ...] = ()) -> dict:
    """Time the image branch (ViT encoder fwd + bwd + AdamW) in several configurations; FLOPs per sample are the
    eagerly counted ones (the same math whichever attention kernel runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    peak = _peak(device)
    out = {}
    for name, mult, backend, mode, dtype in IMAGE_VARIANTS:
        if only and name not in only:
            continue
        torch._dynamo.reset()
        imgs = [torch.cat([b[0]] * mult) for b in batches]
        encoder = build_model(cfg).image_encoder.to(device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).train()
        imgs = [x.to(torch.bfloat16) for x in imgs] if dtype == "bf16" else imgs
        opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4, fused=True)
        compiled = torch.compile(encoder, mode=mode)
        ctx = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()
        t_compile = time.perf_counter()
        try:
            with ctx:
                for x in imgs[:3]:
                    image_step(compiled, opt, (x,))
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for x in imgs[3:]:
                    image_step(compiled, opt, (x,))
                torch.cuda.synchronize()
        except Exception as exc:  # a backend this GPU or build lacks: report, go on
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300], "mfu": None}
            print(f"{name}: failed ({out[name]['error']})", flush=True)
            continue
        seconds = (time.perf_counter() - t0) / max(1, len(imgs) - 3)
        n = imgs[0].shape[0]
        flops = flops_per_sample * n
        out[name] = {"batch_size": n, "attention": backend or "auto", "compile_mode": mode, "params": dtype, "samples_per_s": n / seconds,
                     "tflops_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
                     "warmup_and_compile_s": t0 - t_compile}
        print(f"{name:<36} batch {n:>4}  {n / seconds:>8.0f} samples/s  MFU {out[name]['mfu']:.1%}", flush=True)
        del encoder, opt, compiled
        torch.cuda.empty_cache()
    return out


def profile_kernels(cfg, image_step, batches, device: torch.device, variant: dict, top: int = 15) -> list[dict]:
    """Share of GPU time per kernel for one configuration (where the remaining time goes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    mult = variant["batch_size"] // batches[0][0].shape[0]
    imgs = [torch.cat([b[0]] * mult) for b in batches[:6]]
    bf16 = variant.get("params") == "bf16"
    imgs = [x.to(torch.bfloat16) for x in imgs] if bf16 else imgs
    encoder = torch.compile(build_model(cfg).image_encoder.to(device, dtype=torch.bfloat16 if bf16 else torch.float32).train(),
                            mode=variant["compile_mode"])
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4, fused=True)
    backend = variant["attention"]
    ctx = sdpa_kernel([getattr(SDPBackend, backend)]) if backend != "auto" else contextlib.nullcontext()
    with ctx:
        for x in imgs[:3]:
            image_step(encoder, opt, (x,))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for x in imgs[3:]:
                image_step(encoder, opt, (x,))
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1.0
    rows = sorted(({"kernel": e.key[:90], "share": getattr(e, "self_device_time_total", 0) / total, "calls": e.count} for e in events),
                  key=lambda r: -r["share"])[:top]
    for r in rows:
        print(f"  {r['share']:6.1%}  {r['calls']:>5}  {r['kernel']}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    parser.add_argument("--image-variants", action="store_true", help="GPU: also time the image branch with other attention kernels, batch sizes and compile modes")
    parser.add_argument("--variants", default="", help="comma-separated names from IMAGE_VARIANTS (default: all)")
    parser.add_argument("--image-only", action="store_true", help="GPU: time the image branch only (skip the full pretrain/finetune steps)")
    parser.add_argument("--profile", action="store_true", help="GPU, with --image-variants: kernel time shares of the best configuration")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = create_config(args.preset, img_size=224)
    amp = device.type == "cuda"
    if device.type == "cpu":
        batches = real_batches(args.batch_size, args.steps + 2)
    else:
        rng = np.random.default_rng(0)
        batches = []
        for _ in range(args.steps + 2):
            graphs = [random_graph(rng, {"point": 4, "line": 6, "polygon": 30}, 40) for _ in range(args.batch_size)]
            images = torch.randn(args.batch_size, 3, 224, 224)
            labels = torch.randint(0, 2, (args.batch_size, 224, 224))
            batches.append((images, batch_graphs(graphs), labels))
    batches = [(i.to(device), g.to(device), lab.to(device)) for i, g, lab in batches]

    def pretrain_step(model, opt, b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(b[0], b[1], "pretrain")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def finetune_step(model, opt, b):
        from engine.training.metrics import segmentation_loss

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(b[0], b[1], "fused")
        loss = segmentation_loss(logits.float(), b[2], None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def image_step(encoder, opt, b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = encoder(b[0]).tokens
        loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = {}
    for name, step in (() if args.image_only else (("pretrain", pretrain_step), ("finetune", finetune_step))):
        model = build_model(cfg).to(device).train()
        compile_part = (lambda m: setattr(m, "image_encoder", torch.compile(m.image_encoder)) or m) if args.compile else None
        seconds, flops = time_steps(model, step, batches, 3, device, compile_part)
        rows[name] = {"samples_per_s": args.batch_size / seconds, "tflops_per_step": flops / 1e12, "seconds_per_step": seconds}
        del model
    if device.type == "cuda":
        encoder = build_model(cfg).image_encoder.to(device).train()
        compile_part = torch.compile if args.compile else None
        seconds, flops = time_steps(encoder, image_step, batches, 3, device, compile_part)
        peak = _peak(device)
        rows["image_branch"] = {"samples_per_s": args.batch_size / seconds, "tflops_per_step": flops / 1e12,
                                "achieved_tflops": flops / seconds / 1e12, "mfu": (flops / seconds / peak) if peak else None}
        for key in [k for k in ("pretrain", "finetune") if k in rows]:
            rows[key]["mfu"] = rows[key]["tflops_per_step"] * 1e12 / rows[key]["seconds_per_step"] / peak if peak else None
    if device.type == "cuda" and args.image_variants:
        rows["image_branch_variants"] = image_variants(cfg, image_step, batches, device, rows["image_branch"]["tflops_per_step"] * 1e12 / args.batch_size,
                                                      tuple(args.variants.split(",")) if args.variants else ())
        best = max(rows["image_branch_variants"].values(), key=lambda v: v["mfu"] or 0)
        if (best["mfu"] or 0) > (rows["image_branch"]["mfu"] or 0):
            rows["image_branch"] = best
        if args.profile:
            rows["image_branch"]["top_kernels"] = profile_kernels(cfg, image_step, batches, device, best)
    rows_table = {k: v for k, v in rows.items() if k != "image_branch_variants"}
    print(f"{'step':<14}{'samples/s':>12}{'TFLOP/step':>12}{'MFU':>8}")
    for k, v in rows_table.items():
        mfu = v.get("mfu")
        print(f"{k:<14}{v['samples_per_s']:>12.2f}{v['tflops_per_step']:>12.3f}{(f'{mfu:.1%}' if mfu else '-'):>8}")
    machine_note = torch.cuda.get_device_name() if device.type == "cuda" else "1 CPU thread per worker"
    metrics = {"samples_per_s_per_worker": {k: round(v["samples_per_s"], 2) for k, v in rows_table.items()}}
    if device.type == "cuda":
        metrics["mfu"] = {k: round(v["mfu"], 4) for k, v in rows_table.items() if v.get("mfu")}
    try:
        from common import write_results

        out = write_results("train_gpu" if device.type == "cuda" else "train", metrics,
                            {"preset": args.preset, "batch_size": args.batch_size, "compiled": args.compile, "device": machine_note, "detail": rows})
        print(f"wrote {out}")
    except Exception as exc:  # on a bare GPU machine the results come back through $OUT instead
        print(f"results not written ({exc})")
    import json

    print("JSON", json.dumps({"metrics": metrics, "detail": rows, "device": machine_note}))


if __name__ == "__main__":
    main()
