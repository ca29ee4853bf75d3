"""`geolink-engine assess`: the accuracy assessment of a run's products, then the page and STAC that link it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa

from engine.pipelines.prepare import prepared_imagery
from engine.pipelines.publish import publish_products
from engine.workspace import Workspace

if TYPE_CHECKING:
    from engine.accuracy.assess import AssessConfig
    from engine.accuracy.report import AssessReport


def assess(workspace: Workspace | str | os.PathLike[str], run: str, catalog: pa.Table, cfg: AssessConfig | None = None,
           reference_labels: str | os.PathLike[str] | None = None, say: Callable[[str], None] | None = None,
           publish: bool = False) -> AssessReport:
    """The `assess` stage on a run's products (see :func:`engine.accuracy.assess.run_assess`); with ``publish``,
    the preview page and STAC are rebuilt so they link the report (the command does; ``map`` publishes once, last)."""
    from engine.accuracy.assess import AssessConfig, run_assess

    ws = Workspace.at(workspace)
    catalog = prepared_imagery(catalog, ws)  # the rasters prepare read (model VRTs), as `map` saw them
    report = run_assess(ws, run, catalog, cfg or AssessConfig(), reference_labels=reference_labels, say=say)
    if publish:
        ws.fetch(ws.products(run))  # a remote workspace: the stitched products
        publish_products(ws.products(run), catalog)
    return report
