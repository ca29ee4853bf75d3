"""Sample design: how many sample units in total (Cochran / Olofsson et al. 2014) and how many per stratum.

Why a floor per stratum: proportional allocation gives a rare stratum (urban villages are a few percent of a city)
so few units that its user's accuracy has a huge standard error, or no estimable variance at all. Olofsson et al.
(2014, section 5.1.1) recommend giving rare strata a fixed minimum (50-100) and the rest of the sample
proportionally to area, which keeps overall accuracy and area estimates close to the efficiency of proportional
allocation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def sample_size_overall(class_weights: Mapping[str, float], users_accuracy: Mapping[str, float],
                        target_se: float) -> int:
    """Total sample size that gives overall accuracy the standard error ``target_se`` (Olofsson et al. 2014 eq. 13).

    Cochran's (1977, eq. 5.25) formula for stratified random sampling with strata = map classes, ignoring the
    finite population correction::

        n = ( sum_i W_i S_i / S(O) )^2,   S_i = sqrt(U_i (1 - U_i))

    where ``W_i`` is the share of the mapped area in class i and ``U_i`` its anticipated user's accuracy.

    Args:
        class_weights: class -> mapped share ``W_i`` (or mapped area: normalised to sum to 1).
        users_accuracy: class -> anticipated user's accuracy in [0, 1], for every class of ``class_weights``.
        target_se: wanted standard error of overall accuracy (> 0), e.g. 0.01.

    Returns:
        ``n`` rounded up.

    Example:
        >>> sample_size_overall({"a": 0.02, "b": 0.015, "c": 0.32, "d": 0.645},
        ...                     {"a": 0.7, "b": 0.6, "c": 0.9, "d": 0.95}, 0.01)   # Olofsson et al. 2014 sec. 5.1.1
        641
    """
    if not (math.isfinite(target_se) and target_se > 0):
        raise ValueError(f"target_se must be > 0, got {target_se}")
    missing = sorted(set(class_weights) - set(users_accuracy))
    if missing:
        raise ValueError(f"no anticipated user's accuracy for class(es) {missing}")
    w = np.array([float(class_weights[k]) for k in class_weights])
    u = np.array([float(users_accuracy[k]) for k in class_weights])
    if w.size == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"class weights must be >= 0 with a positive sum, got {dict(class_weights)}")
    if not ((u >= 0) & (u <= 1)).all():
        raise ValueError(f"anticipated user's accuracies must lie in [0, 1], got {dict(users_accuracy)}")
    w = w / w.sum()
    n = (float(np.sum(w * np.sqrt(u * (1 - u)))) / target_se) ** 2
    return max(1, math.ceil(n - 1e-9))  # 1e-9: an exact integer must not round up because of float noise


def _bounded_proportional(weight: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float) -> np.ndarray:
    """Real shares ``clip(lam * weight, lo, hi)`` summing to ``total`` (``sum lo <= total <= sum hi``).

    ``g(lam) = sum clip(lam * w, lo, hi)`` is continuous, piecewise linear and non-decreasing in ``lam`` with kinks
    at ``lo/w`` and ``hi/w``: evaluate it at every kink and interpolate linearly (exact).
    """
    kinks = np.concatenate([lo / weight, hi[np.isfinite(hi)] / weight[np.isfinite(hi)], [0.0]])
    kinks = np.unique(np.append(kinks, kinks.max() + total / weight.min() + 1.0))  # last one: g >= total there
    g = np.clip(np.outer(kinks, weight), lo, hi).sum(axis=1)
    lam = float(np.interp(total, g, kinks))
    return np.clip(lam * weight, lo, hi)


def allocate(strata_sizes: Mapping[str, float], n_total: int, min_per_stratum: int | Mapping[str, int] = 50,
             capacity: Mapping[str, int] | None = None) -> dict[str, int]:
    """Sample units per stratum: at least a minimum each, otherwise proportional to stratum size.

    Each stratum gets ``max(min_h, lam * size_h)`` (and at most ``capacity_h``), with ``lam`` chosen so that the
    counts sum to ``max(n_total, sum of the minimums)``: strata whose proportional share is below their minimum
    get the minimum, the others share the rest in proportion to size. Shares are rounded by largest remainder
    (ties by stratum name), so the result is deterministic and sums exactly.

    Args:
        strata_sizes: stratum -> size (> 0, any unit).
        n_total: wanted total sample size (>= 0).
        min_per_stratum: one minimum for every stratum, or stratum -> minimum (strata not named get 0).
        capacity: optional stratum -> the most units it can give (e.g. its pixel count); caps both the minimum
            and the share. Raises ``ValueError`` if the strata cannot hold the total.

    Returns:
        stratum -> sample size, in the order of ``strata_sizes``.

    Example:
        >>> allocate({"uv": 2.0, "other": 98.0}, 200, min_per_stratum=50)
        {'uv': 50, 'other': 150}
    """
    names = [str(k) for k in strata_sizes]
    if not names:
        raise ValueError("no strata")
    size = np.array([float(v) for v in strata_sizes.values()])
    if not (np.isfinite(size).all() and (size > 0).all()):
        raise ValueError(f"strata sizes must be finite and > 0, got {dict(strata_sizes)}")
    if int(n_total) != n_total or n_total < 0:
        raise ValueError(f"n_total must be a whole number >= 0, got {n_total}")
    if isinstance(min_per_stratum, Mapping):
        unknown = sorted(set(map(str, min_per_stratum)) - set(names))
        if unknown:
            raise ValueError(f"min_per_stratum names unknown strata {unknown}")
        mins = {str(k): v for k, v in min_per_stratum.items()}
        lo = np.array([mins.get(h, 0) for h in names], dtype=float)
    else:
        lo = np.full(len(names), float(min_per_stratum))
    if (lo < 0).any() or (lo != np.round(lo)).any():
        raise ValueError(f"minimums must be whole numbers >= 0, got {min_per_stratum}")
    hi = np.full(len(names), np.inf)
    if capacity is not None:
        unknown = sorted(set(map(str, capacity)) - set(names))
        if unknown:
            raise ValueError(f"capacity names unknown strata {unknown}")
        caps = {str(k): v for k, v in capacity.items()}
        hi = np.array([caps.get(h, np.inf) for h in names], dtype=float)
        if (hi < 0).any():
            raise ValueError(f"capacities must be >= 0, got {dict(capacity)}")
        hi = np.floor(hi)
        lo = np.minimum(lo, hi)
    total = max(float(n_total), float(lo.sum()))
    if total > hi.sum():
        raise ValueError(f"the strata can hold {int(hi.sum())} sample units in all, fewer than the {int(total)} asked")
    if total == 0:
        return dict.fromkeys(names, 0)
    share = _bounded_proportional(size / size.sum(), lo, hi, total)
    counts = np.floor(share + 1e-9)  # 1e-9: a share that is an integer up to float noise stays that integer
    left = int(round(total - counts.sum()))
    if left > 0:
        order = np.lexsort((np.array(names), -(share - counts)))  # largest remainder first, ties by name
        counts[order[:left]] += 1
    return {h: int(c) for h, c in zip(names, counts)}
