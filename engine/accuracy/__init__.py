"""Design-based accuracy assessment: sample design, Stehman (2014) / Olofsson et al. (2014) estimators, file entry.

The statistics core (``estimators``, ``design``, ``tables``) is pure numpy/pandas; sampling, reference labels and
the report build on it.
"""

from engine.accuracy.design import allocate, sample_size_overall
from engine.accuracy.estimators import (
    Z95,
    AccuracyResult,
    Estimate,
    count_cube,
    estimates_from_counts,
    olofsson_estimates,
    stratified_estimates,
)
from engine.accuracy.tables import AccuracyInputError, assess_table, read_samples_csv, read_strata_csv

__all__ = [
    "Z95",
    "AccuracyInputError",
    "AccuracyResult",
    "Estimate",
    "allocate",
    "assess_table",
    "count_cube",
    "estimates_from_counts",
    "olofsson_estimates",
    "read_samples_csv",
    "read_strata_csv",
    "sample_size_overall",
    "stratified_estimates",
]
