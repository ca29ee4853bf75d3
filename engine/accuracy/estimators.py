"""Design-based estimators of map accuracy and class area for stratified random sampling.

Why two forms: the engine stratifies by region x map class (plus a buffer stratum), so the strata are *not* the map
classes and the textbook error-matrix estimators of Olofsson et al. (2014) do not apply directly. Stehman (2014)
writes every quantity as a stratified mean or a stratified ratio of per-unit indicators, which is valid for any
stratification; when the strata are the map classes it gives exactly the Olofsson et al. numbers. Both are here:
:func:`stratified_estimates` (Stehman) is what the engine uses, :func:`olofsson_estimates` (the error-matrix form)
exists so the tests can show the two agree.

Everything is derived from one count cube ``C[h, i, j]`` = number of sample units in stratum ``h`` with map class
``i`` and reference class ``j`` (what DuckDB returns from a ``GROUP BY stratum, map_class, ref_class``); every
indicator used below is binary, so the within-stratum means, variances and covariances follow from those counts.

Two confidence intervals (``interval=``):

- ``"wald"``: the classical estimate +- z SE of Stehman (2014) and Olofsson et al. (2014), SE by linearisation. It
  reproduces the published examples exactly, but where a stratum sampled no error of a kind its SE term is 0, so an
  error too rare to be sampled gives a too-short interval (a producer's accuracy of ``1.00 [1.00, 1.00]``), and with
  few sampled errors the symmetric interval misses on the skewed side (bench/accuracy_coverage.py: 83-88% national
  coverage of producer's accuracy, overall accuracy and UV area at the default design).
- ``"jeffreys"`` (default): the equal-tailed interval of the stratified posterior with a Jeffreys prior, see
  :func:`posterior_bounds`. Every stratum's cell proportions get an independent Dirichlet posterior (Gelman et al.
  2013, sec. 8.3: the posterior of stratified sampling), and each estimate is the same ratio of stratified totals as
  the point estimate, so no linearisation and no normality is assumed: a rare error's posterior stays skewed. The
  prior is Jeffreys' Dirichlet(1/2) for each cell (map class, reference class) *of the domain*, its half count spread
  over the strata in proportion to their area of that map class; with one stratum per map class and two classes,
  user's accuracy gets exactly the Jeffreys interval of a binomial proportion, which holds its nominal coverage
  where errors are rare (Brown, Cai and DasGupta 2001), and no interval has zero width. The estimate and the SE stay
  the classical ones; the interval is widened to hold the estimate (at 0 or 1 this is Brown, Cai and DasGupta's
  modification of the Jeffreys interval).

References:
    Stehman, S. V. (2014). Estimating area and map accuracy for stratified random sampling when the strata are
    different from the map classes. Int. J. Remote Sens. 35, 4923-4939. doi:10.1080/01431161.2014.930207
    Olofsson, P., Foody, G. M., Herold, M., Stehman, S. V., Woodcock, C. E., Wulder, M. A. (2014). Good practices
    for estimating area and assessing accuracy of land change. Remote Sens. Environ. 148, 42-57.
    doi:10.1016/j.rse.2014.02.015
    Brown, L. D., Cai, T. T., DasGupta, A. (2001). Interval estimation for a binomial proportion. Statist. Sci. 16,
    101-133. doi:10.1214/ss/1009213286
    Gelman, A., Carlin, J. B., Stern, H. S., Dunson, D. B., Vehtari, A., Rubin, D. B. (2013). Bayesian Data
    Analysis, 3rd ed., sec. 8.3 (stratified sampling). Chapman & Hall/CRC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

Z95 = 1.959964  # standard normal 97.5% quantile (scipy.stats.norm.ppf(0.975) = 1.959963984540054)
SAMPLE_COLUMNS = ("stratum", "map_class", "ref_class")
INTERVALS = ("jeffreys", "wald")
DEFAULT_INTERVAL = "jeffreys"
JEFFREYS_PRIOR = 0.5  # Dirichlet(1/2) pseudo-count per cell of a domain's error matrix
POSTERIOR_DRAWS = 4000  # the 2.5% quantile then moves by ~4% of a posterior SD between seeds
POSTERIOR_SEED = 2014  # fixed: the same sample gives the same interval


def _check_interval(interval: str) -> str:
    if interval not in INTERVALS:
        raise ValueError(f"interval={interval!r}: use one of {INTERVALS}")
    return interval


def _json_float(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and 95% confidence interval (NaN where not estimable)."""

    estimate: float
    se: float
    ci95: tuple[float, float]

    def to_json(self) -> dict:
        """``{"estimate", "se", "ci95": [lo, hi]}`` with NaN written as ``null`` (JSON has no NaN)."""
        return {"estimate": _json_float(self.estimate), "se": _json_float(self.se),
                "ci95": [_json_float(self.ci95[0]), _json_float(self.ci95[1])]}


@dataclass(frozen=True)
class AccuracyResult:
    """Accuracy and area estimates of one stratified sample, with what limits them (``strata``, ``warnings``)."""

    estimator: str
    n: int
    classes: tuple[str, ...]
    overall_accuracy: Estimate
    users_accuracy: dict[str, Estimate]
    producers_accuracy: dict[str, Estimate]
    area_proportion: dict[str, Estimate]
    area: dict[str, Estimate]  # in the unit of the strata sizes
    strata: dict[str, dict]  # per stratum: size, n, and "note" when the stratum limits the estimates
    warnings: tuple[str, ...]
    interval: str = DEFAULT_INTERVAL  # how ci95 was made: "jeffreys" or "wald"

    def to_json(self) -> dict:
        """The ``R.json`` document of ``assess-table``: estimates per class, then classes, strata and warnings."""
        def per_class(d: dict[str, Estimate]) -> dict:
            return {k: v.to_json() for k, v in d.items()}

        return {
            "estimator": self.estimator,
            "n": int(self.n),
            "interval": self.interval,
            "overall_accuracy": self.overall_accuracy.to_json(),
            "users_accuracy": per_class(self.users_accuracy),
            "producers_accuracy": per_class(self.producers_accuracy),
            "area_proportion": per_class(self.area_proportion),
            "area": per_class(self.area),
            "classes": list(self.classes),
            "strata": {h: {k: (_json_float(v) if isinstance(v, float) else v) for k, v in s.items()}
                       for h, s in self.strata.items()},
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------------------------------
# inputs -> count cube


def _check_sizes(strata_sizes: Mapping[str, float]) -> dict[str, float]:
    sizes = {str(k): float(v) for k, v in strata_sizes.items()}
    if not sizes:
        raise ValueError("no strata sizes given")
    if len(sizes) != len(strata_sizes):
        raise ValueError("strata names collide once written as text")
    bad = {k: v for k, v in sizes.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"strata sizes must be finite and > 0, got {bad}")
    return sizes


def count_cube(samples: pd.DataFrame, strata: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Counts ``C[h, i, j]`` of samples per stratum ``h``, map class ``i`` and reference class ``j``.

    Raises ``ValueError`` naming the first offending sample (its position in ``samples``) for a missing column, an
    empty value, a stratum not in ``strata`` or a class not in ``classes``.
    """
    missing = [c for c in SAMPLE_COLUMNS if c not in samples.columns]
    if missing:
        raise ValueError(f"samples lack the column(s) {missing}; they need {list(SAMPLE_COLUMNS)}")
    codes = []
    for column, levels in (("stratum", strata), ("map_class", classes), ("ref_class", classes)):
        values = samples[column]
        nulls = values.isna().to_numpy()
        text = values.astype(str)
        code = pd.Index(list(levels)).get_indexer(text)  # -1 where not a level
        bad = np.flatnonzero(nulls | (code < 0))
        if bad.size:
            i = int(bad[0])
            shown = list(levels)[:10] + (["..."] if len(levels) > 10 else [])
            what = "is empty" if nulls[i] else f"{text.iloc[i]!r} is not one of {shown}"
            raise ValueError(f"sample {i}: {column} {what} ({bad.size} such samples)")
        codes.append(code.astype(np.int64))
    h, i, j = codes
    k = len(classes)
    flat = np.bincount((h * k + i) * k + j, minlength=len(strata) * k * k)
    return flat.reshape(len(strata), k, k)


# ---------------------------------------------------------------------------------------------------------------
# the Stehman (2014) estimators


def _fpc(size: np.ndarray, n: np.ndarray, fpc: bool, strata: Sequence[str]) -> np.ndarray:
    """``1 - n_h / N_h`` per stratum (1 when ``fpc`` is off); an error where ``n_h > N_h`` (sizes are not counts)."""
    if not fpc:
        return np.ones_like(size)
    over = np.flatnonzero(n > size)
    if over.size:
        h = over[0]
        raise ValueError(f"stratum {strata[h]!r} has {int(n[h])} samples but size {size[h]:g}: with the finite "
                         f"population correction the size must count sampling units (e.g. pixels); give sizes in "
                         f"sampling units or turn the correction off (fpc=False)")
    return 1.0 - n / size


def _ratio(size: np.ndarray, n: np.ndarray, f: np.ndarray, sy: np.ndarray, sx: np.ndarray,
           sxy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ratio estimator ``R = Y / X`` of two binary indicators and its standard error.

    Stehman (2014) eq. 27 (estimator) and eq. 28 (variance)::

        R = sum_h N_h ybar_h / sum_h N_h xbar_h
        V(R) = 1 / X^2 * sum_h N_h^2 (1 - n_h/N_h) s2_uh / n_h,   X = sum_h N_h xbar_h
        s2_uh = s2_yh + R^2 s2_xh - 2 R s_xyh   (= sample variance of u = y - R x within stratum h)

    With ``x = 1`` for every unit, ``X = N`` and this is the stratified mean of ``y`` with eqs. 25-26 as variance,
    which is how overall accuracy and area proportions are computed.

    Args:
        size, n, f: per stratum (shape ``(H,)``): size ``N_h``, sample count ``n_h >= 1``, fpc factor.
        sy, sx: per stratum and estimand (shape ``(H, M)``): sample sums of the indicators ``y`` and ``x``.
        sxy: sample sums of ``x*y``; ``None`` means ``y`` implies ``x`` (``sxy = sy``), true for all uses here.

    Returns:
        ``(R, se)`` of shape ``(M,)``; NaN where ``X = 0`` (no sample unit has ``x = 1``). Strata with ``n_h = 1``
        contribute 0 to the variance (the caller warns: the SE is then a lower bound).
    """
    sxy = sy if sxy is None else sxy
    size, n, f = size[:, None], n[:, None].astype(float), f[:, None]
    y_total = (size * sy / n).sum(axis=0)
    x_total = (size * sx / n).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(x_total > 0, y_total / x_total, np.nan)
        # y and x are indicators: sum y^2 = sy, sum x^2 = sx
        sum_u2 = sy - 2 * ratio * sxy + ratio**2 * sx
        mean_u = (sy - ratio * sx) / n
        s2_u = np.where(n > 1, (sum_u2 - n * mean_u**2) / (n - 1), 0.0)
        s2_u = np.maximum(s2_u, 0.0)  # rounding can leave -1e-17 where the true value is 0
        var = (size**2 * f * s2_u / n).sum(axis=0) / x_total**2
    return ratio, np.sqrt(var)


def _count_cube(counts, strata_sizes: Mapping[str, float], classes: Sequence[str],
                interval: str) -> tuple[dict[str, float], list[str], tuple[str, ...], np.ndarray]:
    """The checked inputs of every estimator over a count cube: ``(sizes, strata, classes, counts)``; ``counts`` must be
    ``(H, K, K)`` (strata in the order of ``strata_sizes``, map class, reference class) and non-negative."""
    _check_interval(interval)
    sizes = _check_sizes(strata_sizes)
    strata, classes = list(sizes), tuple(str(c) for c in classes)
    counts = np.asarray(counts, dtype=np.int64)
    k = len(classes)
    if counts.shape != (len(strata), k, k):
        raise ValueError(f"counts have shape {counts.shape}, expected {(len(strata), k, k)} (strata, map, reference)")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    return sizes, strata, classes, counts


def _sampled_strata(counts: np.ndarray, strata: Sequence[str], sizes: Mapping[str, float], fpc: bool):
    """The strata that hold samples: ``(strata report, warnings, counts, sizes, n, fpc factors, total size)`` of them
    (strata without samples are reported and left out), shared by every estimator over a count cube."""
    size = np.array([sizes[h] for h in strata])
    n = counts.sum(axis=(1, 2))
    if n.sum() == 0:
        raise ValueError("no samples")
    f = _fpc(size, n, fpc, strata)
    report, warnings, used = _strata_report(strata, size, n, f, fpc)
    return report, warnings, counts[used], size[used], n[used], f[used], float(size[used].sum())


def _interval(est: np.ndarray, se: np.ndarray, z: float, upper: float) -> list[tuple[float, float]]:
    lo = np.clip(est - z * se, 0.0, upper)
    hi = np.clip(est + z * se, 0.0, upper)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def _estimates(est: np.ndarray, se: np.ndarray, z: float, upper: float = 1.0,
               bounds: tuple[np.ndarray, np.ndarray] | None = None) -> list[Estimate]:
    """Estimates with the Wald interval, or with ``bounds`` (lo, hi, already in the estimate's unit) where given."""
    if bounds is None:
        cis = _interval(est, se, z, upper)
    else:
        cis = [(float(a), float(b)) for a, b in zip(*bounds)]
    return [Estimate(float(e), float(s), ci) for e, s, ci in zip(est, se, cis)]


# ---------------------------------------------------------------------------------------------------------------
# the stratified Jeffreys posterior interval


def posterior_bounds(counts: np.ndarray, size: np.ndarray, y: np.ndarray, x: np.ndarray, z: float = Z95,
                     draws: int = POSTERIOR_DRAWS, seed: int = POSTERIOR_SEED,
                     prior: float = JEFFREYS_PRIOR, split_errors: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed posterior interval of stratified ratios ``R_q = sum_h N_h E_h[y_q] / sum_h N_h E_h[x_q]``.

    The units of stratum ``h`` fall in the cells (map class i, reference class j) with probabilities ``pi_h``;
    ``y_q`` and ``x_q`` are 0/1 functions of the cell (the indicators of :func:`_ratio`). Given the sample, the
    ``pi_h`` are independent Dirichlet(``C[h] + alpha_h``) (Gelman et al. 2013, sec. 8.3), and ``R_q`` is drawn
    ``draws`` times from them; the interval is its ``(t, 1 - t)`` quantiles, ``t = 1 - Phi(z)``.

    The prior is Jeffreys' Dirichlet(1/2) on every cell of the *domain's* error matrix, each cell's 1/2 pseudo-count
    spread over the strata in proportion to their estimated area of the cell's map class::

        alpha_hij = prior * A_hi / sum_h' A_h'i,   A_hi = N_h m_hi / n_h   (m_hi: units of stratum h mapped i)

    Why spread, not 1/2 per stratum: a domain of many strata would otherwise carry many pseudo-errors (14 region x
    class strata: 7 pseudo-omissions nationally, more than a typical sample finds), which biases every rare error
    upwards; spread, the domain carries the prior of one Jeffreys interval whatever its stratification, and with
    one stratum per map class (two classes) user's accuracy gets exactly the Jeffreys interval of a binomial
    proportion (Brown, Cai and DasGupta 2001). Rows of a stratum with no sampled unit get no prior (the map says
    where class i is). The posterior ignores the finite population correction (each stratum is taken as infinite,
    as the assessment's points are; with sizes in units the interval is then slightly conservative).

    ``split_errors`` (for K > 2 classes, square matrices): each off-diagonal cell gets ``prior / (K - 1)``, so a
    row carries ``prior`` on its correct cell and ``prior`` on its errors together, as with two classes; user's
    accuracy of a class with its own stratum is then the binomial Jeffreys interval ``Beta(x + 1/2, n - x + 1/2)``
    for any K. Without it a row of K classes carries ``(K - 1) / 2`` pseudo-errors (1.5 with four classes), which
    pulls accuracies with few points per stratum down and makes their upper bounds too low. Identical for K = 2.

    Args:
        counts: ``(..., H, I, J)`` counts; leading axes are a batch of samples (every stratum sampled in each).
        size: ``(H,)`` stratum sizes ``N_h``.
        y, x: ``(Q, I, J)`` 0/1 cell indicators of the ``Q`` ratios (``x = 1`` everywhere: a stratified mean).
        z: normal quantile of the two-sided level (1.959964: 95%).
        draws: posterior draws; seed: of the draws (the same counts give the same bounds).
        prior: pseudo-count per domain cell (1/2: Jeffreys).
        split_errors: spread ``prior`` over the K - 1 error cells of a row (see above); default off.

    Returns:
        ``(lo, hi)`` of shape ``(..., Q)``; NaN where some stratum has no sample or a ratio's ``x`` has no mass.

    Example:
        >>> counts = np.array([[[40, 10], [0, 0]], [[0, 0], [0, 50]]])   # strata: mapped a, mapped b; no error in b
        >>> y = np.array([[[1, 0], [0, 1]]]); x = np.ones((1, 2, 2))      # overall accuracy
        >>> lo, hi = posterior_bounds(counts, np.array([100.0, 900.0]), y, x)
        >>> bool(lo[0] < 0.98 < hi[0] < 1.0)                              # (100 * 0.8 + 900) / 1000 = 0.98
        True
    """
    counts = np.asarray(counts, dtype=float)
    size = np.asarray(size, dtype=float)
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    h, i, j = counts.shape[-3:]
    batch = counts.shape[:-3]
    c = counts.reshape(-1, h, i, j)
    n = c.sum(axis=(2, 3))  # (B, H)
    q = y.shape[0]
    lo = np.full((c.shape[0], q), np.nan)
    hi = np.full((c.shape[0], q), np.nan)
    ok = (n > 0).all(axis=1)
    if q == 0 or not ok.any():
        return lo.reshape(*batch, q), hi.reshape(*batch, q)
    c, n = c[ok], n[ok]
    row_area = size[None, :, None] * c.sum(axis=3) / n[..., None]  # (B, H, I): A_hi
    total = row_area.sum(axis=1, keepdims=True)
    alpha = prior * np.divide(row_area, total, out=np.zeros_like(row_area), where=total > 0)
    cell = np.ones((i, j))
    if split_errors and i == j and i > 2:
        cell = np.where(np.eye(i, dtype=bool), 1.0, 1.0 / (i - 1))
    shape = (c + alpha[..., None] * cell).reshape(c.shape[0], -1)  # (B, H*I*J)
    active = np.flatnonzero((shape > 0).any(axis=0))  # cells that can hold mass
    shape = shape[:, active]
    stratum = active // (i * j)
    # float32 draws: twice as fast, and the bounds keep ~7 significant digits, far below their Monte Carlo error
    member = np.zeros((active.size, h), np.float32)
    member[np.arange(active.size), stratum] = 1.0
    weight = (size[stratum, None] / size.max()).astype(np.float32)  # N_h per cell, scaled (ratios do not change)
    ya = y.reshape(q, -1)[:, active % (i * j)].T.astype(np.float32) * weight  # (A, Q): N_h y_q per cell
    xa = x.reshape(q, -1)[:, active % (i * j)].T.astype(np.float32) * weight
    rng = np.random.default_rng(seed)
    chunk = max(1, min(draws, 4_000_000 // max(1, shape.size)))
    ratios = []
    for start in range(0, draws, chunk):
        d = min(chunk, draws - start)
        g = rng.standard_gamma(shape[:, None, :], size=(shape.shape[0], d, shape.shape[1]), dtype=np.float32)
        g /= (g @ member)[..., stratum]  # Dirichlet draws (B, d, A): each stratum's cells sum to 1
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append((g @ ya) / (g @ xa))  # (B, d, Q)
    r = np.concatenate(ratios, axis=1)
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    with np.errstate(invalid="ignore"):
        bounds = np.nanquantile(r, [tail, 1.0 - tail], axis=1) if np.isnan(r).any() else np.quantile(r, [tail, 1.0 - tail], axis=1)
    lo[ok], hi[ok] = bounds[0], bounds[1]
    return lo.reshape(*batch, q), hi.reshape(*batch, q)


def accuracy_indicators(k: int) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray]:
    """The cell indicators ``(y, x)`` of every accuracy quantity of ``k`` classes, in the order
    ``overall, users_k..., producers_k..., proportion_k...``; names are ``(quantity, class index)``."""
    eye = np.eye(k)
    names: list[tuple[str, int]] = [("overall_accuracy", -1)]
    ys, xs = [eye], [np.ones((k, k))]
    for what in ("users_accuracy", "producers_accuracy", "area_proportion"):
        for c in range(k):
            names.append((what, c))
            cell = np.zeros((k, k))
            cell[c, c] = 1.0
            if what == "users_accuracy":
                ys.append(cell)
                xs.append(np.outer(eye[c], np.ones(k)))  # mapped c
            elif what == "producers_accuracy":
                ys.append(cell)
                xs.append(np.outer(np.ones(k), eye[c]))  # reference c
            else:
                ys.append(np.outer(np.ones(k), eye[c]))
                xs.append(np.ones((k, k)))
    return names, np.array(ys), np.array(xs)


def _hull(est: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval widened to hold the estimate (a posterior quantile may fall just short of an estimate of 0 or 1);
    NaN where the estimate is."""
    bad = np.isnan(est)
    return np.where(bad, np.nan, np.fmin(lo, est)), np.where(bad, np.nan, np.fmax(hi, est))


def _strata_report(strata: Sequence[str], size: np.ndarray, n: np.ndarray, f: np.ndarray,
                   fpc: bool) -> tuple[dict[str, dict], list[str], np.ndarray]:
    """Per-stratum size/n/note and the warnings; returns the mask of strata that enter the estimates (``n_h > 0``)."""
    report: dict[str, dict] = {}
    warnings: list[str] = []
    used = n > 0
    total = float(size.sum())
    for h, name in enumerate(strata):
        entry: dict = {"size": float(size[h]), "n": int(n[h])}
        if n[h] == 0:
            entry["note"] = "no samples: excluded from every estimate"
            warnings.append(f"stratum {name!r} (size {size[h]:g}, {size[h] / total:.2%} of the total) has no samples: "
                            f"it is left out, so the estimates describe only the sampled strata and are biased for "
                            f"the whole map")
        elif n[h] == 1 and not (fpc and f[h] == 0):
            entry["note"] = "1 sample: variance not estimable, counted as 0"
            warnings.append(f"stratum {name!r} has 1 sample: its variance cannot be estimated and is counted as 0, "
                            f"so every standard error and CI is understated (a lower bound); sample it at least twice")
        report[name] = entry
    return report, warnings, used


def estimates_from_counts(counts: np.ndarray, strata_sizes: Mapping[str, float], classes: Sequence[str],
                          fpc: bool = True, z: float = Z95, interval: str = DEFAULT_INTERVAL,
                          split_errors: bool = False) -> AccuracyResult:
    """Stehman (2014) estimates from the count cube ``counts[h, i, j]`` (strata in the order of ``strata_sizes``).

    The whole computation is vectorised over strata and classes; see :func:`stratified_estimates` for the meaning
    of every estimate, of ``fpc`` and of ``interval``; ``split_errors``: the Jeffreys prior of a row spread over its
    error cells (for more than two classes, see :func:`posterior_bounds`).
    """
    sizes, strata, classes, counts = _count_cube(counts, strata_sizes, classes, interval)
    report, warnings, c, size, n, f, total = _sampled_strata(counts, strata, sizes, fpc)

    diag = np.diagonal(c, axis1=1, axis2=2)  # (H, K): y = 1 if map = ref = k
    map_k = c.sum(axis=2)  # (H, K): x = 1 if map = k
    ref_k = c.sum(axis=1)  # (H, K): y = 1 if ref = k
    ones = np.broadcast_to(n[:, None], ref_k.shape)  # x = 1 for every unit: a stratified mean

    # overall accuracy: y = 1 if map = ref (eqs. 12 and 25-26); area proportion of k: y = 1 if ref = k (eqs. 14, 25-26)
    oa, oa_se = _ratio(size, n, f, diag.sum(axis=1, keepdims=True), n[:, None])
    prop, prop_se = _ratio(size, n, f, ref_k, ones)
    # user's accuracy of k: y = 1 if map = ref = k, x = 1 if map = k (eqs. 18-19, 27-28)
    ua, ua_se = _ratio(size, n, f, diag, map_k)
    # producer's accuracy of k: same y, x = 1 if ref = k (eqs. 22-23, 27-28)
    pa, pa_se = _ratio(size, n, f, diag, ref_k)

    for name, values, why in (("user's", ua, "mapped as"), ("producer's", pa, "with reference class")):
        for cls in [c for c, v in zip(classes, values) if np.isnan(v)]:
            warnings.append(f"{name} accuracy of {cls!r} is not estimable: no sample {why} {cls!r}")
    return _accuracy_result("stehman2014", c, size, total, classes, (oa, oa_se), (ua, ua_se), (pa, pa_se),
                            (prop, prop_se), report, warnings, z, interval, split_errors)


def _accuracy_result(estimator: str, c: np.ndarray, size: np.ndarray, total: float, classes: tuple[str, ...],
                     oa: tuple, ua: tuple, pa: tuple, prop: tuple, report: dict, warnings: list[str], z: float,
                     interval: str, split_errors: bool = False) -> AccuracyResult:
    """The result of the point estimates and SEs ``(est, se)``, with Wald or posterior intervals from the cube ``c``
    (sampled strata only)."""
    k = len(classes)
    est = {"overall_accuracy": oa, "users_accuracy": ua, "producers_accuracy": pa, "area_proportion": prop}
    bounds: dict[str, tuple | None] = dict.fromkeys(est)
    if interval == "jeffreys":
        names, ys, xs = accuracy_indicators(k)
        lo, hi = posterior_bounds(c, size, ys, xs, z, split_errors=split_errors)
        for what in est:
            pos = [p for p, (name, _) in enumerate(names) if name == what]
            bounds[what] = _hull(np.atleast_1d(est[what][0]), lo[pos], hi[pos])
    area_bounds = None if bounds["area_proportion"] is None else tuple(b * total for b in bounds["area_proportion"])
    oa_est, oa_se = np.atleast_1d(oa[0]), np.atleast_1d(oa[1])
    return AccuracyResult(
        estimator=estimator,
        n=int(c.sum()),
        classes=classes,
        overall_accuracy=_estimates(oa_est, oa_se, z, bounds=bounds["overall_accuracy"])[0],
        users_accuracy=dict(zip(classes, _estimates(ua[0], ua[1], z, bounds=bounds["users_accuracy"]))),
        producers_accuracy=dict(zip(classes, _estimates(pa[0], pa[1], z, bounds=bounds["producers_accuracy"]))),
        area_proportion=dict(zip(classes, _estimates(prop[0], prop[1], z, bounds=bounds["area_proportion"]))),
        area=dict(zip(classes, _estimates(prop[0] * total, prop[1] * total, z, upper=total, bounds=area_bounds))),
        strata=report,
        warnings=tuple(warnings),
        interval=interval,
    )


def _classes_of(samples: pd.DataFrame, classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        out = [str(c) for c in classes]
        if len(set(out)) != len(out) or not out:
            raise ValueError(f"classes must be distinct and not empty, got {out}")
        return out
    missing = [c for c in ("map_class", "ref_class") if c not in samples.columns]
    if missing:
        raise ValueError(f"samples lack the column(s) {missing}; they need {list(SAMPLE_COLUMNS)}")
    values = pd.concat([samples["map_class"], samples["ref_class"]]).dropna().astype(str)
    return sorted(values.unique())


def stratified_estimates(samples: pd.DataFrame, strata_sizes: Mapping[str, float],
                         classes: Sequence[str] | None = None, fpc: bool = True,
                         z: float = Z95, interval: str = DEFAULT_INTERVAL) -> AccuracyResult:
    """Overall, user's and producer's accuracy and class areas with SEs and CIs (Stehman 2014).

    Valid for stratified random sampling with any strata (region x map class, a buffer stratum, ...): units are
    drawn with equal probability within a stratum and independently between strata. Each estimate is a stratified
    ratio of indicators, see :func:`_ratio` for the equations (eq. numbers of Stehman 2014):

    - overall accuracy: stratified mean of ``y = [map = ref]`` (eq. 12, variance eqs. 25-26);
    - user's accuracy of k: ratio of ``y = [map = k and ref = k]`` to ``x = [map = k]`` (eqs. 18-19, 27-28);
    - producer's accuracy of k: same ``y``, ``x = [ref = k]`` (eqs. 22-23, 27-28);
    - area proportion of k: stratified mean of ``y = [ref = k]`` (eq. 14, 25-26); area = proportion x total size.

    Confidence intervals (``interval``): ``"jeffreys"`` (default), the stratified Jeffreys posterior interval of
    :func:`posterior_bounds` (never of zero width, and it keeps its coverage where errors are rare); ``"wald"``, the
    classical estimate +- z * SE, clipped to [0, 1] for proportions and to [0, total size] for areas (the
    published examples of Stehman 2014 and Olofsson et al. 2014 come out exactly). Estimates and SEs are the same
    under both.

    Finite population correction: with ``fpc=True`` each stratum's variance term is multiplied by ``1 - n_h/N_h``
    where ``N_h`` is the stratum size *taken as a count of sampling units*. That is exact when sizes are pixel
    counts and the sampling unit is a pixel; for sizes in m2 and point samples it is ~1 (harmless); for sizes in a
    coarse unit (ha, km2) it would be wrong, so pass ``fpc=False`` there (an error is raised where ``n_h > N_h``).

    Thin strata are reported, never silently hidden: a stratum with 1 sample contributes 0 variance (its variance
    is not estimable) and gets a note in ``strata`` plus a warning that every SE is a lower bound; a stratum with
    no samples is left out (estimates then describe the sampled strata only, and a warning says so). Estimates
    whose denominator is 0 (no sample mapped as k, or none with reference k) are NaN with a warning.

    Args:
        samples: one row per sample unit, columns ``stratum``, ``map_class``, ``ref_class`` (others ignored).
        strata_sizes: stratum -> size (pixels, m2, ha, ...; areas come out in that unit); every sample's stratum
            must be here.
        classes: the class labels in report order; default: sorted labels seen in the samples.
        fpc: apply the finite population correction (sizes must then count sampling units).
        z: normal quantile of the interval (1.959964 for 95%).
        interval: ``"jeffreys"`` or ``"wald"``.

    Returns:
        An :class:`AccuracyResult` (``estimator="stehman2014"``).

    Example:
        >>> s = pd.DataFrame({"stratum": ["a"] * 4 + ["b"] * 4,
        ...                   "map_class": ["uv", "uv", "uv", "other", "other", "other", "other", "uv"],
        ...                   "ref_class": ["uv", "uv", "other", "other", "other", "uv", "other", "uv"]})
        >>> r = stratified_estimates(s, {"a": 100, "b": 300}, fpc=False)
        >>> round(r.overall_accuracy.estimate, 4)   # (100 * 3/4 + 300 * 3/4) / 400
        0.75
    """
    sizes = _check_sizes(strata_sizes)
    if len(samples) == 0:
        raise ValueError("no samples")
    cls = _classes_of(samples, classes)
    return estimates_from_counts(count_cube(samples, list(sizes), cls), sizes, cls, fpc=fpc, z=z, interval=interval)


# ---------------------------------------------------------------------------------------------------------------
# a ratio of two estimated class areas (e.g. the urban-village share of built-up land)


@dataclass(frozen=True)
class AreaRatio:
    """Two estimated class areas and their ratio: ``numerator`` = area whose reference class is in ``part``,
    ``denominator`` = area whose reference class is in ``whole``, ``ratio`` = numerator / denominator (in the unit
    of the strata sizes; the ratio as a fraction)."""

    n: int
    part: tuple[str, ...]
    whole: tuple[str, ...]
    numerator: Estimate
    denominator: Estimate
    ratio: Estimate
    interval: str
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"n": int(self.n), "interval": self.interval, "part": list(self.part), "whole": list(self.whole),
                "numerator": self.numerator.to_json(), "denominator": self.denominator.to_json(),
                "ratio": self.ratio.to_json(), "warnings": list(self.warnings)}


def area_ratio_from_counts(counts: np.ndarray, strata_sizes: Mapping[str, float], classes: Sequence[str],
                           part: Sequence[str], whole: Sequence[str], fpc: bool = True, z: float = Z95,
                           interval: str = DEFAULT_INTERVAL) -> AreaRatio:
    """The areas of the reference classes ``part`` and ``whole`` and their ratio, from ``counts[h, i, j]``.

    The ratio is a ratio of two estimated totals (Stehman 2014 eqs. 27-28, see :func:`_ratio`)::

        R = sum_h N_h ybar_h / sum_h N_h xbar_h,     y = [ref in part],  x = [ref in whole]
        V(R) = 1 / X^2 * sum_h N_h^2 (1 - n_h/N_h) s2_uh / n_h,   u = y - R x   (linearisation)

    and the areas are the total size times the stratified means of ``y`` and ``x`` (eqs. 14, 25-26). ``part`` need
    not lie inside ``whole`` (the covariance uses ``x * y``). Intervals as in :func:`stratified_estimates`: the
    stratified Jeffreys posterior (``"jeffreys"``) or estimate +- z SE (``"wald"``).

    Args:
        counts: ``(H, K, K)`` counts per stratum (order of ``strata_sizes``), map class and reference class.
        classes: the ``K`` class labels of both axes.
        part, whole: reference classes of the numerator and of the denominator.
    """
    sizes, strata, classes, counts = _count_cube(counts, strata_sizes, classes, interval)
    k = len(classes)
    unknown = sorted((set(part) | set(whole)) - set(classes))
    if unknown or not part or not whole:
        raise ValueError(f"part {list(part)} and whole {list(whole)} must be non-empty lists of the classes {list(classes)}")
    _, warnings, c, size, n, f, total = _sampled_strata(counts, strata, sizes, fpc)
    yj = np.isin(classes, list(part)).astype(float)
    xj = np.isin(classes, list(whole)).astype(float)
    ref = c.sum(axis=1)  # (H, K): units per reference class
    sy, sx, sxy = ref @ yj, ref @ xj, ref @ (xj * yj)
    ones = n.astype(float)
    props, props_se = _ratio(size, n, f, np.stack([sy, sx], axis=1), np.stack([ones, ones], axis=1))
    ratio, ratio_se = _ratio(size, n, f, sy[:, None], sx[:, None], sxy[:, None])
    est = np.concatenate([props, ratio])
    se = np.concatenate([props_se, ratio_se])
    if np.isnan(ratio[0]):
        warnings.append(f"the ratio is not estimable: no sample with reference class in {list(whole)}")
    if interval == "jeffreys":
        ycell = np.broadcast_to(yj, (k, k))
        xcell = np.broadcast_to(xj, (k, k))
        one = np.ones((k, k))
        lo, hi = posterior_bounds(c, size, np.stack([ycell, xcell, ycell]), np.stack([one, one, xcell]), z)
        lo, hi = _hull(est, lo, hi)
        scale = np.array([total, total, 1.0])
        out = _estimates(est * scale, se * scale, z, bounds=(lo * scale, hi * scale))
    else:
        out = (_estimates(est[:2] * total, se[:2] * total, z, upper=total) + _estimates(est[2:], se[2:], z))
    return AreaRatio(int(n.sum()), tuple(part), tuple(whole), out[0], out[1], out[2], interval, tuple(warnings))


def area_ratio_estimates(samples: pd.DataFrame, strata_sizes: Mapping[str, float], part: Sequence[str],
                         whole: Sequence[str], ref_column: str = "ref_class", fpc: bool = True, z: float = Z95,
                         interval: str = DEFAULT_INTERVAL) -> AreaRatio:
    """:func:`area_ratio_from_counts` of a sample (columns ``stratum``, ``map_class`` and ``ref_column``).

    Example (the urban-village share of built-up land; hand arithmetic in tests/test_accuracy_estimators.py):
        >>> s = pd.DataFrame({"stratum": ["u"] * 4 + ["o"] * 4, "map_class": ["uv"] * 4 + ["other"] * 4,
        ...                   "ref_land": ["uv", "uv", "uv", "built_up", "built_up", "built_up", "other", "uv"]})
        >>> r = area_ratio_estimates(s, {"u": 100, "o": 900}, ["uv"], ["uv", "built_up"], "ref_land", fpc=False)
        >>> round(r.ratio.estimate, 4)   # (100 * 3/4 + 900 * 1/4) / (100 * 4/4 + 900 * 3/4) = 300 / 775
        0.3871
    """
    sizes = _check_sizes(strata_sizes)
    if len(samples) == 0:
        raise ValueError("no samples")
    if ref_column not in samples.columns:
        raise ValueError(f"samples lack the column {ref_column!r}")
    as_ref = samples[["stratum", "map_class", ref_column]].rename(columns={ref_column: "ref_class"})
    cls = sorted(set(_classes_of(as_ref, None)) | set(map(str, part)) | set(map(str, whole)))
    return area_ratio_from_counts(count_cube(as_ref, list(sizes), cls), sizes, cls, part, whole, fpc=fpc, z=z,
                                  interval=interval)


# ---------------------------------------------------------------------------------------------------------------
# the Olofsson et al. (2014) error-matrix form (strata = map classes)


def olofsson_estimates(samples: pd.DataFrame, class_areas: Mapping[str, float],
                       classes: Sequence[str] | None = None, fpc: bool = True,
                       z: float = Z95, interval: str = DEFAULT_INTERVAL) -> AccuracyResult:
    """The error-matrix estimators of Olofsson et al. (2014), for samples stratified by map class.

    With ``n_ij`` the sample error matrix (rows: map class = stratum, columns: reference class), ``n_i.`` its row
    sums, ``A_i`` the mapped area of class i, ``W_i = A_i / A`` (equation numbers of Olofsson et al. 2014)::

        p_ij = W_i n_ij / n_i.                                                  (eq. 4)
        O = sum_j p_jj,  U_i = p_ii / p_i.,  P_j = p_jj / p_.j                   (eqs. 1-3)
        V(O)   = sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)                          (eq. 5)
        V(U_i) = U_i (1 - U_i) / (n_i. - 1)                                      (eq. 6)
        V(P_j) = 1/N_.j^2 [ N_j.^2 (1 - P_j)^2 U_j (1 - U_j) / (n_j. - 1)
                            + P_j^2 sum_{i != j} N_i.^2 n_ij/n_i. (1 - n_ij/n_i.) / (n_i. - 1) ]   (eq. 7)
        N_.j = sum_i N_i. n_ij / n_i.                                            (eq. 8)
        p_.k = sum_i W_i n_ik / n_i.,  S(p_.k)^2 = sum_i W_i^2 n_ik/n_i. (1 - n_ik/n_i.) / (n_i. - 1)   (eqs. 9-10)
        A_k = A p_.k,  S(A_k) = A S(p_.k)                                        (eqs. 11-12)

    With ``fpc=True`` every stratum term is multiplied by ``1 - n_i./N_i.`` (the published formulas have none,
    ``fpc=False`` reproduces them). Map classes with one sample contribute 0 variance and with none are left out,
    with the same notes and warnings as :func:`stratified_estimates`, which this must equal numerically (with
    ``interval="wald"``, the published intervals; ``"jeffreys"`` gives the posterior intervals of
    :func:`posterior_bounds` from the same counts).

    Args:
        samples: columns ``map_class`` and ``ref_class`` (a ``stratum`` column, if any, is ignored: the stratum is
            the map class).
        class_areas: mapped size of every map class.
    """
    _check_interval(interval)
    sizes = _check_sizes(class_areas)
    if len(samples) == 0:
        raise ValueError("no samples")
    cls = _classes_of(samples, classes)
    if classes is None:  # a mapped class may have no samples at all: it is still a (left out) stratum
        cls = sorted(set(cls) | set(sizes))
    unknown = sorted(set(sizes) - set(cls))
    if unknown:
        raise ValueError(f"class_areas name {unknown}, which are not classes {cls}")
    as_strata = samples.assign(stratum=samples["map_class"])
    cube = count_cube(as_strata, cls, cls)  # strata = map classes, in class order
    nij = cube.sum(axis=0).astype(float)  # (K, K) error matrix of counts
    area = np.array([sizes.get(c, 0.0) for c in cls])
    ni = nij.sum(axis=1)
    missing = [c for c, a, m in zip(cls, area, ni) if a == 0 and m > 0]
    if missing:
        raise ValueError(f"samples are mapped as {missing} but class_areas give no area for them")
    mapped = area > 0
    f_all = np.ones_like(area)
    f_all[mapped] = _fpc(area[mapped], ni[mapped], fpc, [c for c, m in zip(cls, mapped) if m])
    report, warnings, _ = _strata_report([c for c in sizes], np.array(list(sizes.values())),
                                         np.array([ni[cls.index(c)] for c in sizes]),
                                         np.array([f_all[cls.index(c)] for c in sizes]), fpc)

    used = ni > 0  # map classes that were sampled; the others are left out (warned above)
    nij, ni, area_u, f = nij[used], ni[used], area[used], f_all[used]
    total = float(area_u.sum())
    w = area_u / total
    k_used = np.flatnonzero(used)  # row i of nij is map class k_used[i]
    frac = nij / ni[:, None]  # n_ij / n_i.
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.where(ni > 1, ni - 1, np.inf)  # n_i. = 1: term 0 (variance not estimable; warned)
        p = w[:, None] * frac  # eq. 4
        u_rows = frac[np.arange(len(k_used)), k_used]  # U_i of the sampled map classes
        oa = float(np.trace(p[:, k_used]))  # eq. 1
        oa_var = float((w**2 * f * u_rows * (1 - u_rows) / denom).sum())  # eq. 5

        ua = np.full(len(cls), np.nan)
        ua_var = np.full(len(cls), np.nan)
        ua[k_used] = u_rows  # eq. 2
        ua_var[k_used] = f * u_rows * (1 - u_rows) / denom  # eq. 6

        prop = p.sum(axis=0)  # eq. 9: p_.k
        prop_var = (w[:, None] ** 2 * f[:, None] * frac * (1 - frac) / denom[:, None]).sum(axis=0)  # eq. 10

        n_hat = (area_u[:, None] * frac).sum(axis=0)  # eq. 8: N_.j
        diag = np.zeros(len(cls))
        diag[k_used] = p[np.arange(len(k_used)), k_used]
        pa = np.where(prop > 0, diag / prop, np.nan)  # eq. 3
        pa_var = np.full(len(cls), np.nan)
        for j in range(len(cls)):  # eq. 7
            own = k_used == j
            t_own = (area_u[own] ** 2 * f[own] * (1 - pa[j]) ** 2 * u_rows[own] * (1 - u_rows[own]) / denom[own]).sum()
            oth = ~own
            t_oth = pa[j] ** 2 * (area_u[oth] ** 2 * f[oth] * frac[oth, j] * (1 - frac[oth, j]) / denom[oth]).sum()
            pa_var[j] = (t_own + t_oth) / n_hat[j] ** 2 if n_hat[j] > 0 else np.nan

    for name, values, why in (("user's", ua, "mapped as"), ("producer's", pa, "with reference class")):
        for c in [c for c, v in zip(cls, values) if np.isnan(v)]:
            warnings.append(f"{name} accuracy of {c!r} is not estimable: no sample {why} {c!r}")
    # area = A p_.k with S(A_k) = A S(p_.k): eqs. 11-12
    return _accuracy_result("olofsson2014", cube[used], area_u, total, tuple(cls), (np.array([oa]), np.sqrt([oa_var])),
                            (ua, np.sqrt(ua_var)), (pa, np.sqrt(pa_var)), (prop, np.sqrt(prop_var)), report, warnings,
                            z, interval)
