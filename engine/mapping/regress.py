"""A regression model's value per tile (`map --population-model`): the tile population pass's predictor.

The pass is an embedding pass in every respect but what it writes: one float per tile, the quantity inside the
tile's window in its own units (residents for a population model), stored as a ``(1, 1)`` vector in
:data:`~engine.mapping.store.EMBEDDING_PARTS`, so the ledger, commit point, orphan adoption and resume are those
of `map` and `embed` (:func:`engine.pipelines.infer.run_inference` with
:class:`~engine.mapping.embed.EncodeAndWrite`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.mapping.embed import TileEncoder


class TileRegressor(TileEncoder):
    """The bundle's regression head on a batch of tiles: float32 ``(B, 1, 1)``, the quantity in each window, in the
    target's units (``log1p``/scale undone as in training: :func:`geolink_model.regression.from_model_scale`)."""

    def __init__(self, model_dir: str, mode: str = "fused", device: str | None = None, torch_threads: int | None = None,
                 max_attempts: int = 2, fail_tiles: tuple[str, ...] = ()) -> None:
        super().__init__(model_dir, mode, "tile", device, torch_threads, max_attempts, fail_tiles)
        if not self.model.cfg.regression_targets:
            raise ValueError(f"model {model_dir} has no regression head (fine-tune it with --task population)")
        self.log_target, self.target_scale = self.bundle.regression_scale
        self.dim = 1

    def predict(self, batch: pa.Table) -> np.ndarray:
        from geolink_model.regression import from_model_scale

        def regress(images, graphs, mode, lonlat):
            return self.model(images if mode != "osm" else None, graphs, mode, lonlat, "regress")

        values = from_model_scale(self.run_model(batch, regress).float(), self.log_target, self.target_scale)
        return values.reshape(-1, 1, 1).cpu().numpy().astype(np.float32)
