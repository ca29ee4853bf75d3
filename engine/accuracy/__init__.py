"""Design-based accuracy assessment: sample design, Stehman (2014) / Olofsson et al. (2014) estimators, file entry.

The statistics core (``estimators``, ``design``, ``tables``) is pure numpy/pandas; sampling, reference labels and
the report build on it (``sampling``, ``reference``, ``report``, ``assess``: the `assess` stage, :func:`run_assess`).
The stage's names are imported on first use, so ``assess-table`` does not pay for rasterio, geopandas and matplotlib.
"""

import importlib

from engine.accuracy.design import allocate, sample_size_overall
from engine.accuracy.estimators import (
    DEFAULT_INTERVAL,
    INTERVALS,
    Z95,
    AccuracyResult,
    AreaRatio,
    Estimate,
    area_ratio_estimates,
    area_ratio_from_counts,
    count_cube,
    estimates_from_counts,
    olofsson_estimates,
    posterior_bounds,
    stratified_estimates,
)
from engine.accuracy.tables import AccuracyInputError, assess_table, read_samples_csv, read_strata_csv

_LAZY = {
    "AssessConfig": "engine.accuracy.assess",
    "run_assess": "engine.accuracy.assess",
    "AssessReport": "engine.accuracy.report",
    "DomainResult": "engine.accuracy.report",
    "SampleConfig": "engine.accuracy.sampling",
    "read_labels": "engine.accuracy.reference",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine.accuracy' has no attribute {name!r}")


__all__ = [
    "DEFAULT_INTERVAL",
    "INTERVALS",
    "Z95",
    "AccuracyInputError",
    "AccuracyResult",
    "AreaRatio",
    "AssessConfig",
    "AssessReport",
    "DomainResult",
    "SampleConfig",
    "Estimate",
    "allocate",
    "area_ratio_estimates",
    "area_ratio_from_counts",
    "assess_table",
    "count_cube",
    "estimates_from_counts",
    "olofsson_estimates",
    "posterior_bounds",
    "read_samples_csv",
    "read_labels",
    "read_strata_csv",
    "run_assess",
    "sample_size_overall",
    "stratified_estimates",
]
