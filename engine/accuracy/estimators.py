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

References:
    Stehman, S. V. (2014). Estimating area and map accuracy for stratified random sampling when the strata are
    different from the map classes. Int. J. Remote Sens. 35, 4923-4939. doi:10.1080/01431161.2014.930207
    Olofsson, P., Foody, G. M., Herold, M., Stehman, S. V., Woodcock, C. E., Wulder, M. A. (2014). Good practices
    for estimating area and assessing accuracy of land change. Remote Sens. Environ. 148, 42-57.
    doi:10.1016/j.rse.2014.02.015
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

Z95 = 1.959964  # standard normal 97.5% quantile (scipy.stats.norm.ppf(0.975) = 1.959963984540054)
SAMPLE_COLUMNS = ("stratum", "map_class", "ref_class")


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

    def to_json(self) -> dict:
        """The ``R.json`` document of ``assess-table``: estimates per class, then classes, strata and warnings."""
        def per_class(d: dict[str, Estimate]) -> dict:
            return {k: v.to_json() for k, v in d.items()}

        return {
            "estimator": self.estimator,
            "n": int(self.n),
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


def _interval(est: np.ndarray, se: np.ndarray, z: float, upper: float) -> list[tuple[float, float]]:
    lo = np.clip(est - z * se, 0.0, upper)
    hi = np.clip(est + z * se, 0.0, upper)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def _estimates(est: np.ndarray, se: np.ndarray, z: float, upper: float = 1.0) -> list[Estimate]:
    return [Estimate(float(e), float(s), ci) for e, s, ci in zip(est, se, _interval(est, se, z, upper))]


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
                          fpc: bool = True, z: float = Z95) -> AccuracyResult:
    """Stehman (2014) estimates from the count cube ``counts[h, i, j]`` (strata in the order of ``strata_sizes``).

    The whole computation is vectorised over strata and classes; see :func:`stratified_estimates` for the meaning
    of every estimate and of ``fpc``.
    """
    sizes = _check_sizes(strata_sizes)
    strata, classes = list(sizes), tuple(str(c) for c in classes)
    counts = np.asarray(counts, dtype=np.int64)
    k = len(classes)
    if counts.shape != (len(strata), k, k):
        raise ValueError(f"counts have shape {counts.shape}, expected {(len(strata), k, k)} (strata, map, reference)")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    size = np.array([sizes[h] for h in strata])
    n = counts.sum(axis=(1, 2))
    if n.sum() == 0:
        raise ValueError("no samples")
    f = _fpc(size, n, fpc, strata)
    report, warnings, used = _strata_report(strata, size, n, f, fpc)
    c, size, n, f = counts[used], size[used], n[used], f[used]
    total = float(size.sum())

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
    return AccuracyResult(
        estimator="stehman2014",
        n=int(n.sum()),
        classes=classes,
        overall_accuracy=_estimates(oa, oa_se, z)[0],
        users_accuracy=dict(zip(classes, _estimates(ua, ua_se, z))),
        producers_accuracy=dict(zip(classes, _estimates(pa, pa_se, z))),
        area_proportion=dict(zip(classes, _estimates(prop, prop_se, z))),
        area=dict(zip(classes, _estimates(prop * total, prop_se * total, z, upper=total))),
        strata=report,
        warnings=tuple(warnings),
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
                         z: float = Z95) -> AccuracyResult:
    """Overall, user's and producer's accuracy and class areas with SEs and CIs (Stehman 2014).

    Valid for stratified random sampling with any strata (region x map class, a buffer stratum, ...): units are
    drawn with equal probability within a stratum and independently between strata. Each estimate is a stratified
    ratio of indicators, see :func:`_ratio` for the equations (eq. numbers of Stehman 2014):

    - overall accuracy: stratified mean of ``y = [map = ref]`` (eq. 12, variance eqs. 25-26);
    - user's accuracy of k: ratio of ``y = [map = k and ref = k]`` to ``x = [map = k]`` (eqs. 18-19, 27-28);
    - producer's accuracy of k: same ``y``, ``x = [ref = k]`` (eqs. 22-23, 27-28);
    - area proportion of k: stratified mean of ``y = [ref = k]`` (eq. 14, 25-26); area = proportion x total size.

    95% CI = estimate +- z * SE, clipped to [0, 1] for proportions and to [0, total size] for areas.

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
    return estimates_from_counts(count_cube(samples, list(sizes), cls), sizes, cls, fpc=fpc, z=z)


# ---------------------------------------------------------------------------------------------------------------
# the Olofsson et al. (2014) error-matrix form (strata = map classes)


def olofsson_estimates(samples: pd.DataFrame, class_areas: Mapping[str, float],
                       classes: Sequence[str] | None = None, fpc: bool = True,
                       z: float = Z95) -> AccuracyResult:
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
    with the same notes and warnings as :func:`stratified_estimates`, which this must equal numerically.

    Args:
        samples: columns ``map_class`` and ``ref_class`` (a ``stratum`` column, if any, is ignored: the stratum is
            the map class).
        class_areas: mapped size of every map class.
    """
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
    prop_se = np.sqrt(prop_var)
    classes_t = tuple(cls)
    return AccuracyResult(
        estimator="olofsson2014",
        n=int(ni.sum()),
        classes=classes_t,
        overall_accuracy=_estimates(np.array([oa]), np.sqrt([oa_var]), z)[0],
        users_accuracy=dict(zip(classes_t, _estimates(ua, np.sqrt(ua_var), z))),
        producers_accuracy=dict(zip(classes_t, _estimates(pa, np.sqrt(pa_var), z))),
        area_proportion=dict(zip(classes_t, _estimates(prop, prop_se, z))),
        area=dict(zip(classes_t, _estimates(prop * total, prop_se * total, z, upper=total))),  # eqs. 11-12
        strata=report,
        warnings=tuple(warnings),
    )
