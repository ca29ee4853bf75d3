"""Predictors for the `map` actor pool: a batch of tiles in, per-tile class probabilities out.

A predictor is a callable class (Ray Data builds it once per actor, so the model is loaded once per actor) taking
a pyarrow batch with the tile-index, graph and ``image`` columns (see :func:`engine.mapping.batches.read_pixels`)
and returning one row per tile: ``tile_id, city, input_hash, n_classes, height, width, probs`` (uint8, see
:func:`engine.mapping.store.encode_probs`), ``status`` (``ok``/``failed``), ``error``, ``attempts``, timings.

- :class:`ModelPredictor` runs a GeoLink bundle (safetensors + JSON) in ``fused``, ``image`` or ``osm`` mode.
- :class:`OraclePredictor` reads the reference polygons instead: perfect predictions, to test stitching and to
  measure the pipeline without a model.

Failures stay per tile: a batch that raises is retried tile by tile, each up to ``max_attempts`` times, so one
bad tile is recorded as failed with its error and never takes its batch down.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from engine import storage
from engine.mapping.store import encode_probs

OUTPUT_COLUMNS = ("tile_id", "city", "input_hash", "n_classes", "height", "width", "probs", "status", "error", "attempts",
                  "read_s", "predict_s")


class Predictor:
    """Shared batch handling: per-tile failure isolation, retries, output rows. Subclasses define ``predict``."""

    n_classes: int

    def __init__(self, max_attempts: int = 2, fail_tiles: tuple[str, ...] = ()) -> None:
        self.max_attempts = max_attempts
        self.fail_tiles = frozenset(fail_tiles)  # fault drills: these tiles raise, to prove the run reports them

    def predict(self, batch: pa.Table) -> np.ndarray:
        """Float probabilities ``(B, K, H, W)`` for the rows of ``batch`` (all readable)."""
        raise NotImplementedError

    def _checked(self, batch: pa.Table) -> np.ndarray:
        bad = self.fail_tiles.intersection(batch["tile_id"].to_pylist())
        if bad:
            raise RuntimeError(f"injected failure for tile {sorted(bad)[0]}")
        return self.predict(batch)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["tile_id", "city", "input_hash", "read_error", "read_s"]).to_pylist()
        readable = [i for i, r in enumerate(rows) if not r["read_error"]]
        out: list[dict] = []
        for r in rows:
            out.append({"tile_id": r["tile_id"], "city": r["city"], "input_hash": r["input_hash"], **self._blank(),
                        "status": "failed", "error": r["read_error"] or "", "attempts": 1, "read_s": float(r["read_s"]),
                        "predict_s": 0.0})
        if readable:
            t0 = time.perf_counter()
            try:
                probs = self._checked(batch if len(readable) == batch.num_rows else batch.take(readable))
                seconds = (time.perf_counter() - t0) / len(readable)
                for i, p in zip(readable, probs):
                    self._fill(out[i], p, 1, seconds)
            except Exception:  # isolate the failing tile(s): one at a time, with retries
                for i in readable:
                    self._one(batch.slice(i, 1), out[i])
        return pa.Table.from_pylist(out)

    def _one(self, row: pa.Table, record: dict) -> None:
        for attempt in range(1, self.max_attempts + 1):
            t0 = time.perf_counter()
            try:
                self._fill(record, self._checked(row)[0], attempt, time.perf_counter() - t0)
                return
            except Exception as exc:
                record.update(status="failed", attempts=attempt, error=f"predict: {type(exc).__name__}: {exc}")

    def _blank(self) -> dict:
        """The output fields of a tile without a result (a failed one)."""
        return {"n_classes": self.n_classes, "height": 0, "width": 0, "probs": b""}

    @staticmethod
    def _fill(record: dict, probs: np.ndarray, attempts: int, seconds: float) -> None:
        record.update(status="ok", error="", attempts=attempts, predict_s=seconds, height=int(probs.shape[1]), width=int(probs.shape[2]),
                      probs=encode_probs(probs))


class ModelPredictor(Predictor):
    """A GeoLink bundle (:class:`~engine.model_bundle.ModelBundle`: checked, then its weights loaded; pixels normalised
    as the bundle says) on CPU or GPU (bf16 autocast on GPU); ``torch_threads`` follows the actor's CPUs."""

    def __init__(self, model_dir: str, mode: str = "fused", device: str | None = None, torch_threads: int | None = None,
                 max_attempts: int = 2, fail_tiles: tuple[str, ...] = ()) -> None:
        super().__init__(max_attempts, fail_tiles)
        import torch

        from engine.model_bundle import ModelBundle

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        bundle = ModelBundle.load(storage.local_path(model_dir))  # fetched on a fresh node
        self.model = bundle.load_model(device=self.device)
        self.model.eval()
        self.mode = mode
        self.bundle = bundle
        self.normalisation = bundle.normalisation
        self.n_classes = self.model.cfg.num_classes
        self.img_size = self.model.cfg.img_size

    def predict(self, batch: pa.Table) -> np.ndarray:
        import torch

        logits = self.run_model(batch, self.model)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def run_model(self, batch: pa.Table, call):
        """``call(images, graphs, mode=..., lonlat=...)`` (the model, or a method of it such as ``encode``) on the batch's
        model inputs: collated, normalised as the bundle says, size-checked, in inference mode (bf16 autocast on GPU)."""
        import torch

        from engine.pixels import collate, tile_lonlat

        images, graphs, _ = collate(batch, self.device, self.normalisation)
        lonlat = tile_lonlat(batch, self.device) if self.model.cfg.with_location else None  # tile centres, for a location model
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            raise ValueError(f"tiles are {tuple(images.shape[-2:])} px but the model expects {self.img_size} px; "
                             "prepare with --tile-size matching the model")
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device != "cpu"):
            return call(images, graphs, mode=self.mode, lonlat=lonlat)


class OraclePredictor(Predictor):
    """Perfect predictions from the reference polygons (one-hot), for stitching tests and pipeline benchmarks."""

    def __init__(self, references: dict[str, str], classes: tuple[str, ...], max_attempts: int = 2,
                 fail_tiles: tuple[str, ...] = ()) -> None:
        super().__init__(max_attempts, fail_tiles)
        self.references = references
        self.classes = tuple(classes)
        self.n_classes = len(classes)

    def predict(self, batch: pa.Table) -> np.ndarray:
        from engine.pixels import tile_labels

        keys = ("tile_id", "city", "imagery", "crs", "window_col_off", "window_row_off", "window_width", "window_height")
        out = []
        for row in batch.select(list(keys)).to_pylist():
            labels = tile_labels(row, self.references[row["city"]], self.classes)
            out.append((np.arange(self.n_classes)[:, None, None] == labels[None]).astype(np.float32))
        return np.stack(out)
