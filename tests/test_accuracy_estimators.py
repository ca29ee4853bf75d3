"""The accuracy statistics core: estimators against hand arithmetic and published examples, design, file entry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.accuracy import (
    AccuracyInputError,
    Estimate,
    allocate,
    area_ratio_estimates,
    assess_table,
    estimates_from_counts,
    olofsson_estimates,
    read_samples_csv,
    read_strata_csv,
    sample_size_overall,
    stratified_estimates,
)
from engine.accuracy.estimators import accuracy_indicators, posterior_bounds

Z = 1.959964


def frame(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    """Samples from (stratum, map_class, ref_class, count) rows."""
    out = [(h, m, r) for h, m, r, k in rows for _ in range(k)]
    return pd.DataFrame(out, columns=["stratum", "map_class", "ref_class"])


def bvar(ones: int, n: int) -> float:
    """Sample variance (n - 1 divisor) of a 0/1 variable with ``ones`` ones among ``n``."""
    return ones * (n - ones) / (n * (n - 1))


def bcov(both: int, ones_x: int, ones_y: int, n: int) -> float:
    """Sample covariance of two 0/1 variables: ``both`` units have x = y = 1."""
    return (both - ones_x * ones_y / n) / (n - 1)


def check(est: Estimate, value: float, se: float, upper: float = 1.0) -> None:
    assert est.estimate == pytest.approx(value, rel=1e-12, abs=1e-15)
    assert est.se == pytest.approx(se, rel=1e-10, abs=1e-15)
    lo, hi = max(0.0, value - Z * se), min(upper, value + Z * se)
    assert est.ci95 == pytest.approx((lo, hi), rel=1e-10, abs=1e-12)


def same(a, b, rel: float = 1e-12) -> None:
    """Two AccuracyResults agree on every estimate and SE."""
    assert a.classes == b.classes
    for name in ("users_accuracy", "producers_accuracy", "area_proportion", "area"):
        for c in a.classes:
            x, y = getattr(a, name)[c], getattr(b, name)[c]
            np.testing.assert_allclose([x.estimate, x.se, *x.ci95], [y.estimate, y.se, *y.ci95], rtol=rel,
                                       atol=1e-14, err_msg=f"{name}[{c}]")
    x, y = a.overall_accuracy, b.overall_accuracy
    np.testing.assert_allclose([x.estimate, x.se, *x.ci95], [y.estimate, y.se, *y.ci95], rtol=rel)


# ------------------------------------------------------------------------------------------------------------
# strata = map classes, two classes, fpc on: every estimate by hand


def test_two_map_class_strata_by_hand():
    # uv stratum: 1000 px, 10 samples all mapped uv, 8 of them uv on the ground;
    # other stratum: 9000 px, 20 samples mapped other, 2 of them uv on the ground
    s = frame([("uv", "uv", "uv", 8), ("uv", "uv", "other", 2),
               ("other", "other", "other", 18), ("other", "other", "uv", 2)])
    r = stratified_estimates(s, {"uv": 1000, "other": 9000}, classes=["uv", "other"], interval="wald")
    f1, f2 = 1 - 10 / 1000, 1 - 20 / 9000
    w1, w2 = 0.1, 0.9

    check(r.overall_accuracy, w1 * 0.8 + w2 * 0.9,
          math.sqrt(w1**2 * f1 * 0.8 * 0.2 / 9 + w2**2 * f2 * 0.9 * 0.1 / 19))
    check(r.users_accuracy["uv"], 0.8, math.sqrt(f1 * 0.8 * 0.2 / 9))
    check(r.users_accuracy["other"], 0.9, math.sqrt(f2 * 0.9 * 0.1 / 19))
    p_uv = w1 * 0.8 + w2 * 0.1  # 0.17
    se_p_uv = math.sqrt(w1**2 * f1 * 0.8 * 0.2 / 9 + w2**2 * f2 * 0.1 * 0.9 / 19)
    check(r.area_proportion["uv"], p_uv, se_p_uv)
    check(r.area_proportion["other"], 1 - p_uv, se_p_uv)
    check(r.area["uv"], 10000 * p_uv, 10000 * se_p_uv, upper=10000)
    # producer's accuracy of uv: N_.uv = 1000 * 0.8 + 9000 * 0.1 = 1700
    pa = 800 / 1700
    se = math.sqrt(1000**2 * f1 * (1 - pa) ** 2 * 0.8 * 0.2 / 9 + pa**2 * 9000**2 * f2 * 0.1 * 0.9 / 19) / 1700
    check(r.producers_accuracy["uv"], pa, se)
    pa_o = 9000 * 0.9 / (9000 * 0.9 + 1000 * 0.2)
    se_o = math.sqrt(9000**2 * f2 * (1 - pa_o) ** 2 * 0.9 * 0.1 / 19
                     + pa_o**2 * 1000**2 * f1 * 0.2 * 0.8 / 9) / (9000 * 0.9 + 1000 * 0.2)
    check(r.producers_accuracy["other"], pa_o, se_o)
    assert r.estimator == "stehman2014" and r.n == 30 and r.warnings == ()
    assert r.strata == {"uv": {"size": 1000.0, "n": 10}, "other": {"size": 9000.0, "n": 20}}
    same(r, olofsson_estimates(s, {"uv": 1000, "other": 9000}, classes=["uv", "other"], interval="wald"))


# ------------------------------------------------------------------------------------------------------------
# strata != map classes: region x map class, by hand


def test_region_by_class_strata_by_hand():
    # north: uv 100 px (5 samples, 4 truly uv), other 900 px (10 samples, 1 truly uv)
    # south: uv 200 px (5 samples, 2 truly uv), other 800 px (10 samples, all other)
    s = frame([("n_uv", "uv", "uv", 4), ("n_uv", "uv", "other", 1),
               ("n_ot", "other", "uv", 1), ("n_ot", "other", "other", 9),
               ("s_uv", "uv", "uv", 2), ("s_uv", "uv", "other", 3),
               ("s_ot", "other", "other", 10)])
    sizes = {"n_uv": 100, "n_ot": 900, "s_uv": 200, "s_ot": 800}
    r = stratified_estimates(s, sizes, classes=["uv", "other"], interval="wald")
    f_nu, f_no, f_su, f_so = 1 - 5 / 100, 1 - 10 / 900, 1 - 5 / 200, 1 - 10 / 800

    oa = (100 * 4 / 5 + 900 * 9 / 10 + 200 * 2 / 5 + 800 * 1) / 2000
    v_oa = (100**2 * f_nu * bvar(4, 5) / 5 + 900**2 * f_no * bvar(9, 10) / 10
            + 200**2 * f_su * bvar(2, 5) / 5 + 800**2 * f_so * bvar(10, 10) / 10) / 2000**2
    check(r.overall_accuracy, oa, math.sqrt(v_oa))

    # user's accuracy of uv: only the uv strata have x = 1; there y - R x = y - R, variance of y
    ua = (100 * 0.8 + 200 * 0.4) / (100 + 200)
    v_ua = (100**2 * f_nu * bvar(4, 5) / 5 + 200**2 * f_su * bvar(2, 5) / 5) / 300**2
    check(r.users_accuracy["uv"], ua, math.sqrt(v_ua))

    # producer's accuracy of uv: X = 80 + 90 + 80 = 250, Y = 160
    pa = 160 / 250
    s2u_nu = bvar(4, 5) + pa**2 * bvar(4, 5) - 2 * pa * bcov(4, 4, 4, 5)  # y = x in a uv stratum
    s2u_no = 0 + pa**2 * bvar(1, 10) - 0  # y = 0 there
    s2u_su = bvar(2, 5) + pa**2 * bvar(2, 5) - 2 * pa * bcov(2, 2, 2, 5)
    v_pa = (100**2 * f_nu * s2u_nu / 5 + 900**2 * f_no * s2u_no / 10 + 200**2 * f_su * s2u_su / 5) / 250**2
    check(r.producers_accuracy["uv"], pa, math.sqrt(v_pa))

    p = (100 * 0.8 + 900 * 0.1 + 200 * 0.4 + 0) / 2000
    v_p = (100**2 * f_nu * bvar(4, 5) / 5 + 900**2 * f_no * bvar(1, 10) / 10 + 200**2 * f_su * bvar(2, 5) / 5) / 2000**2
    check(r.area_proportion["uv"], p, math.sqrt(v_p))
    check(r.area["uv"], 2000 * p, 2000 * math.sqrt(v_p), upper=2000)
    check(r.area["other"], 2000 * (1 - p), 2000 * math.sqrt(v_p), upper=2000)


# ------------------------------------------------------------------------------------------------------------
# Stehman (2014) numerical example (strata A-D differ from the map classes): the paper's Table 2 data


def stehman_example() -> tuple[pd.DataFrame, dict[str, float]]:
    s = ["A"] * 10 + ["B"] * 10 + ["C"] * 10 + ["D"] * 10
    m = ["A"] * 7 + ["B"] * 3 + ["A"] + ["B"] * 11 + ["C"] * 6 + ["B"] * 2 + ["D"] * 10
    r = (["A"] * 5 + ["C", "B", "A", "B", "C"] + ["A"] + ["B"] * 5 + ["A", "A", "B", "B"]
         + ["C"] * 5 + ["D", "D", "B", "B", "A"] + ["D"] * 7 + ["C", "C", "B"])
    return pd.DataFrame({"stratum": s, "map_class": m, "ref_class": r}), {"A": 40000, "B": 30000, "C": 20000, "D": 10000}


def test_stehman_2014_example_by_hand_and_published():
    samples, sizes = stehman_example()
    r = stratified_estimates(samples, sizes, classes=list("ABCD"), fpc=False, interval="wald")
    N = np.array([40000, 30000, 20000, 10000])
    # per stratum A, B, C, D (10 samples each): counts of y = 1 (and x = 1) read off the data
    ref_a = [6, 3, 1, 0]  # reference A
    ref_c = [2, 0, 5, 2]  # reference C
    correct = [6, 8, 4, 7]  # map = reference
    p_a = (N * np.array(ref_a) / 10).sum() / N.sum()
    se_a = math.sqrt(sum(N**2 * np.array([bvar(k, 10) for k in ref_a]) / 10)) / N.sum()
    check(r.area_proportion["A"], p_a, se_a)
    p_c = (N * np.array(ref_c) / 10).sum() / N.sum()
    se_c = math.sqrt(sum(N**2 * np.array([bvar(k, 10) for k in ref_c]) / 10)) / N.sum()
    check(r.area_proportion["C"], p_c, se_c)
    oa = (N * np.array(correct) / 10).sum() / N.sum()
    se_oa = math.sqrt(sum(N**2 * np.array([bvar(k, 10) for k in correct]) / 10)) / N.sum()
    check(r.overall_accuracy, oa, se_oa)

    # user's accuracy of B: y = map B and ref B, x = map B
    y, x = np.array([1, 7, 1, 0]), np.array([3, 9, 4, 0])
    ua = (N * y).sum() / (N * x).sum()
    s2u = np.array([bvar(y[h], 10) + ua**2 * bvar(x[h], 10) - 2 * ua * bcov(y[h], x[h], y[h], 10) for h in range(4)])
    check(r.users_accuracy["B"], ua, math.sqrt((N**2 * s2u / 10).sum()) / (N * x / 10).sum())
    # producer's accuracy of B: same y, x = ref B (per stratum 2, 7, 2, 1)
    x = np.array([2, 7, 2, 1])
    pa = (N * y).sum() / (N * x).sum()
    s2u = np.array([bvar(y[h], 10) + pa**2 * bvar(x[h], 10) - 2 * pa * bcov(y[h], x[h], y[h], 10) for h in range(4)])
    check(r.producers_accuracy["B"], pa, math.sqrt((N**2 * s2u / 10).sum()) / (N * x / 10).sum())

    # the values printed in Stehman (2014), pp. 4932-4936
    assert round(r.area_proportion["A"].estimate, 2) == 0.35 and round(r.area_proportion["A"].se, 3) == 0.082
    assert round(r.area_proportion["C"].estimate, 2) == 0.20 and round(r.area_proportion["C"].se, 3) == 0.064
    assert round(r.overall_accuracy.estimate, 2) == 0.63 and round(r.overall_accuracy.se, 3) == 0.085
    assert round(r.users_accuracy["B"].estimate, 3) == 0.574 and round(r.users_accuracy["B"].se, 3) == 0.125
    assert round(r.producers_accuracy["B"].estimate, 3) == 0.794
    assert r.producers_accuracy["B"].ci95[1] == 1.0  # 0.794 + 1.96 * 0.117 > 1: clipped


# ------------------------------------------------------------------------------------------------------------
# Olofsson et al. (2014) section 5 example: strata = map classes; published numbers and Stehman == Olofsson

OLOFSSON_MATRIX = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])  # rows map, cols ref
OLOFSSON_CLASSES = ["deforestation", "forest_gain", "stable_forest", "stable_non_forest"]
OLOFSSON_AREAS_PX = dict(zip(OLOFSSON_CLASSES, [200_000, 150_000, 3_200_000, 6_450_000]))


def olofsson_samples() -> pd.DataFrame:
    rows = [(OLOFSSON_CLASSES[i], OLOFSSON_CLASSES[i], OLOFSSON_CLASSES[j], int(OLOFSSON_MATRIX[i, j]))
            for i in range(4) for j in range(4)]
    return frame(rows)


@pytest.mark.parametrize("fpc", [False, True])
def test_olofsson_2014_example(fpc: bool):
    s = olofsson_samples()
    o = olofsson_estimates(s, OLOFSSON_AREAS_PX, classes=OLOFSSON_CLASSES, fpc=fpc, interval="wald")
    st = stratified_estimates(s, OLOFSSON_AREAS_PX, classes=OLOFSSON_CLASSES, fpc=fpc, interval="wald")
    same(st, o)
    assert o.estimator == "olofsson2014" and o.n == st.n == 640

    # by hand: W = (0.02, 0.015, 0.32, 0.645), n_i. = (75, 75, 165, 325)
    w, ni = np.array([0.02, 0.015, 0.32, 0.645]), np.array([75, 75, 165, 325])
    f = 1 - ni / np.array([200_000, 150_000, 3_200_000, 6_450_000]) if fpc else np.ones(4)
    u = np.array([66 / 75, 55 / 75, 153 / 165, 313 / 325])
    check(o.overall_accuracy, (w * u).sum(), math.sqrt((w**2 * f * u * (1 - u) / (ni - 1)).sum()))
    p_def = 0.02 * 66 / 75 + 0.015 * 0 / 75 + 0.32 * 1 / 165 + 0.645 * 2 / 325
    v_def = (0.02**2 * f[0] * (66 / 75) * (9 / 75) / 74 + 0 + 0.32**2 * f[2] * (1 / 165) * (164 / 165) / 164
             + 0.645**2 * f[3] * (2 / 325) * (323 / 325) / 324)
    check(o.area_proportion["deforestation"], p_def, math.sqrt(v_def))

    # published (Olofsson et al. 2014, section 5; 30 m pixels = 0.09 ha, CI half-width with z = 1.96)
    ha = 0.09
    area = {c: (round(o.area[c].estimate * ha), round(1.96 * o.area[c].se * ha)) for c in OLOFSSON_CLASSES}
    if not fpc:
        assert area == {"deforestation": (21158, 6158), "forest_gain": (11686, 3756),
                        "stable_forest": (285770, 15510), "stable_non_forest": (581386, 16282)}
    assert round(o.overall_accuracy.estimate, 3) == 0.947 and round(1.96 * o.overall_accuracy.se, 2) == 0.02
    assert round(o.users_accuracy["deforestation"].estimate, 2) == 0.88
    assert round(1.96 * o.users_accuracy["deforestation"].se, 2) == 0.07
    assert round(o.producers_accuracy["deforestation"].estimate, 2) == 0.75
    assert round(1.96 * o.producers_accuracy["deforestation"].se, 2) == 0.21


@pytest.mark.parametrize("seed", range(5))
def test_stehman_equals_olofsson_on_random_samples(seed: int):
    """Random error matrices, thin strata (1 sample) and classes never mapped or never seen included."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]
    sizes = {"a": 500.0, "b": 3000.0, "c": 12000.0}  # "d" is a class nobody mapped
    n = {"a": int(rng.integers(1, 4)), "b": int(rng.integers(2, 30)), "c": int(rng.integers(2, 60))}
    rows = [(h, h, str(rng.choice(classes, p=[0.3, 0.3, 0.3, 0.1])), 1) for h in sizes for _ in range(n[h])]
    s = frame(rows)
    for fpc in (False, True):
        o = olofsson_estimates(s, sizes, classes=classes, fpc=fpc, interval="wald")
        st = stratified_estimates(s, sizes, classes=classes, fpc=fpc, interval="wald")
        same(st, o, rel=1e-10)
        assert st.strata == o.strata and st.warnings == o.warnings
    assert math.isnan(st.users_accuracy["d"].estimate)


# ------------------------------------------------------------------------------------------------------------
# thin and empty strata, not estimable ratios, JSON


def test_single_sample_stratum_counts_zero_variance_and_warns():
    s = frame([("a", "uv", "uv", 3), ("a", "uv", "other", 1), ("b", "other", "other", 1)])
    r = stratified_estimates(s, {"a": 100, "b": 900}, classes=["uv", "other"], fpc=False, interval="wald")
    # OA = (100 * 3/4 + 900 * 1) / 1000; only stratum a contributes variance
    check(r.overall_accuracy, (75 + 900) / 1000, math.sqrt(100**2 * bvar(3, 4) / 4) / 1000)
    assert r.strata["b"]["n"] == 1 and "not estimable" in r.strata["b"]["note"]
    assert any("'b' has 1 sample" in w and "lower bound" in w for w in r.warnings)
    # a stratum that is sampled whole (n = N = 1) has truly zero variance: no warning with the fpc
    r = stratified_estimates(s, {"a": 100, "b": 1}, classes=["uv", "other"], fpc=True)
    assert "note" not in r.strata["b"] and r.warnings == ()


def test_unsampled_stratum_is_left_out_with_a_warning():
    s = frame([("a", "uv", "uv", 3), ("a", "uv", "other", 1), ("b", "other", "other", 4), ("b", "other", "uv", 1)])
    base = stratified_estimates(s, {"a": 100, "b": 900}, classes=["uv", "other"])
    r = stratified_estimates(s, {"a": 100, "b": 900, "c": 50}, classes=["uv", "other"])
    same(r, base)
    assert r.strata["c"] == {"size": 50.0, "n": 0, "note": "no samples: excluded from every estimate"}
    assert any("'c'" in w and "no samples" in w for w in r.warnings)


def test_not_estimable_ratio_is_nan_and_null_in_json():
    s = frame([("a", "uv", "other", 3), ("b", "other", "other", 4)])
    r = stratified_estimates(s, {"a": 100, "b": 900}, classes=["uv", "other"])
    assert math.isnan(r.producers_accuracy["uv"].estimate)  # no reference uv at all
    assert r.users_accuracy["uv"].estimate == 0.0
    doc = r.to_json()
    assert doc["producers_accuracy"]["uv"] == {"estimate": None, "se": None, "ci95": [None, None]}
    assert any("producer's accuracy of 'uv'" in w for w in r.warnings)
    json.dumps(doc, allow_nan=False)
    assert list(doc) == ["estimator", "n", "interval", "overall_accuracy", "users_accuracy", "producers_accuracy",
                         "area_proportion", "area", "classes", "strata", "warnings"]
    assert doc["interval"] == "jeffreys"


def test_fpc_needs_sizes_that_count_sampling_units():
    s = frame([("a", "uv", "uv", 5), ("b", "other", "other", 5)])
    with pytest.raises(ValueError, match="fpc=False"):
        stratified_estimates(s, {"a": 2.5, "b": 900}, fpc=True)
    r = stratified_estimates(s, {"a": 2.5, "b": 900}, fpc=False)
    assert r.area["uv"].estimate == pytest.approx(2.5)


def test_estimates_from_counts_matches_samples():
    samples, sizes = stehman_example()
    classes = list("ABCD")
    counts = np.zeros((4, 4, 4), dtype=int)
    for h, m, r in samples.itertuples(index=False):
        counts["ABCD".index(h), classes.index(m), classes.index(r)] += 1
    same(estimates_from_counts(counts, sizes, classes), stratified_estimates(samples, sizes, classes))


def test_python_api_rejects_bad_samples():
    s = frame([("a", "uv", "uv", 2)])
    with pytest.raises(ValueError, match="stratum 'a' is not one of"):
        stratified_estimates(s, {"b": 10})
    with pytest.raises(ValueError, match="ref_class"):
        stratified_estimates(s.drop(columns="ref_class"), {"a": 10})
    with pytest.raises(ValueError, match="> 0"):
        stratified_estimates(s, {"a": 0})
    with pytest.raises(ValueError, match="'uv' is not one of"):
        stratified_estimates(s, {"a": 10}, classes=["other"])
    with pytest.raises(ValueError, match="no samples"):
        stratified_estimates(s.iloc[:0], {"a": 10})


# ------------------------------------------------------------------------------------------------------------
# Monte Carlo: repeated stratified samples of a synthetic population with known truth


def test_monte_carlo_unbiased_and_covering():
    rng = np.random.default_rng(42)
    # two regions x two map classes; the map misses some uv and over-maps a little
    n_pop = {"north_uv": 600, "north_other": 5400, "south_uv": 300, "south_other": 6700}
    p_uv = {"north_uv": 0.8, "north_other": 0.05, "south_uv": 0.6, "south_other": 0.02}
    pop = {h: np.where(rng.random(n) < p_uv[h], "uv", "other") for h, n in n_pop.items()}
    map_of = {h: ("uv" if h.endswith("_uv") else "other") for h in n_pop}
    total = sum(n_pop.values())
    true_oa = sum(((pop[h] == map_of[h]).sum()) for h in n_pop) / total
    true_uv = sum((pop[h] == "uv").sum() for h in n_pop)
    mapped_uv_correct = sum((pop[h] == "uv").sum() for h in n_pop if map_of[h] == "uv")
    true_pa = mapped_uv_correct / true_uv

    n_h = {"north_uv": 40, "north_other": 60, "south_uv": 40, "south_other": 60}
    oa, pa, area, hits = [], [], [], np.zeros(3)
    reps = 300
    for _ in range(reps):
        rows = [(h, map_of[h], ref) for h in n_pop for ref in rng.choice(pop[h], n_h[h], replace=False)]
        r = stratified_estimates(pd.DataFrame(rows, columns=["stratum", "map_class", "ref_class"]), n_pop,
                                 classes=["uv", "other"])
        oa.append(r.overall_accuracy.estimate)
        pa.append(r.producers_accuracy["uv"].estimate)
        area.append(r.area["uv"].estimate)
        for i, (est, truth) in enumerate(((r.overall_accuracy, true_oa), (r.area["uv"], true_uv),
                                          (r.producers_accuracy["uv"], true_pa))):
            hits[i] += est.ci95[0] <= truth <= est.ci95[1]
    assert np.mean(oa) == pytest.approx(true_oa, abs=0.005)  # SE of the mean ~ 0.02 / sqrt(300) ~ 0.001
    assert np.mean(area) == pytest.approx(true_uv, rel=0.03)
    assert np.mean(pa) == pytest.approx(true_pa, abs=0.03)  # ratio estimator: small bias allowed
    assert (hits / reps >= 0.88).all(), hits / reps


# ------------------------------------------------------------------------------------------------------------
# a ratio of two estimated totals: the UV share of built-up land


def test_ratio_of_totals_and_its_se_by_hand():
    # stratum u (mapped uv, 100 m2): 5 points, reference uv 3, built-up 1, other 1
    # stratum o (mapped other, 900 m2): 6 points, reference uv 1, built-up 3, other 2
    s = frame([("u", "uv", "uv", 3), ("u", "uv", "built_up", 1), ("u", "uv", "other", 1),
               ("o", "other", "uv", 1), ("o", "other", "built_up", 3), ("o", "other", "other", 2)])
    s = s.rename(columns={"ref_class": "ref_land"})
    sizes = {"u": 100.0, "o": 900.0}
    r = area_ratio_estimates(s, sizes, ["uv"], ["uv", "built_up"], "ref_land", fpc=False, interval="wald")
    # y = [ref uv], x = [ref uv or built-up]; per stratum: ybar_u = 3/5, xbar_u = 4/5, ybar_o = 1/6, xbar_o = 4/6
    y_tot = 100 * 3 / 5 + 900 * 1 / 6  # 60 + 150 = 210 m2 of UV
    x_tot = 100 * 4 / 5 + 900 * 4 / 6  # 80 + 600 = 680 m2 of built-up land
    ratio = y_tot / x_tot
    # u = y - R x per unit: in u, 3 units (1 - R), 1 unit (-R), 1 unit 0; in o, 1 unit (1 - R), 3 units (-R), 2 units 0
    def s2(values: list[float]) -> float:
        v = np.array(values)
        return float(((v - v.mean()) ** 2).sum() / (len(v) - 1))
    s2_u = s2([1 - ratio] * 3 + [-ratio] + [0.0])
    s2_o = s2([1 - ratio] + [-ratio] * 3 + [0.0] * 2)
    se = math.sqrt(100**2 * s2_u / 5 + 900**2 * s2_o / 6) / x_tot
    check(r.ratio, ratio, se)
    assert r.ratio.estimate == pytest.approx(210 / 680)
    # the areas: total x the stratified means, SE from the within-stratum variances of the 0/1 indicators
    check(r.numerator, y_tot, math.sqrt(100**2 * bvar(3, 5) / 5 + 900**2 * bvar(1, 6) / 6), upper=1000)
    check(r.denominator, x_tot, math.sqrt(100**2 * bvar(4, 5) / 5 + 900**2 * bvar(4, 6) / 6), upper=1000)
    assert r.n == 11 and r.part == ("uv",) and r.whole == ("uv", "built_up") and r.interval == "wald"
    # the same estimates and SEs under the default interval, which holds the estimate
    j = area_ratio_estimates(s, sizes, ["uv"], ["uv", "built_up"], "ref_land", fpc=False)
    assert (j.ratio.estimate, j.ratio.se) == (r.ratio.estimate, r.ratio.se) and j.interval == "jeffreys"
    assert j.ratio.ci95[0] < j.ratio.estimate < j.ratio.ci95[1]
    json.dumps(j.to_json(), allow_nan=False)
    with pytest.raises(ValueError, match="part"):
        area_ratio_estimates(s, sizes, [], ["uv"], "ref_land")


# ------------------------------------------------------------------------------------------------------------
# honest intervals: the stratified Jeffreys posterior


def test_jeffreys_interval_of_one_stratum_is_the_binomial_jeffreys_interval():
    # user's accuracy in a single stratum mapped uv: 46 of 50 correct -> Beta(46.5, 4.5) quantiles
    from scipy.stats import beta

    s = frame([("u", "uv", "uv", 46), ("u", "uv", "other", 4), ("o", "other", "other", 50)])
    r = stratified_estimates(s, {"u": 10.0, "o": 90.0}, classes=["uv", "other"], fpc=False)
    lo, hi = beta.ppf([0.025, 0.975], 46.5, 4.5)
    assert r.users_accuracy["uv"].ci95 == pytest.approx((lo, hi), abs=0.006)  # Monte Carlo quantiles (4000 draws)
    assert r.users_accuracy["uv"].estimate == pytest.approx(46 / 50) and r.interval == "jeffreys"
    # deterministic: the same sample gives the same interval
    assert stratified_estimates(s, {"u": 10.0, "o": 90.0}, classes=["uv", "other"], fpc=False) == r
    with pytest.raises(ValueError, match="interval"):
        stratified_estimates(s, {"u": 10.0, "o": 90.0}, interval="exact")


def test_no_zero_width_interval_when_a_stratum_sampled_no_error():
    """Coverage smoke: the map misses a village far from mapped UV (1% of the other stratum); the 40 points there
    found none. Wald says PA = 1 [1, 1]; the default interval is not a point and still holds the census value."""
    sizes = {"uv": 1_000.0, "other": 99_000.0}
    # census: the uv stratum is 80% UV, the other stratum 1% UV -> true UV = 800 + 990, PA = 800 / 1790 = 0.447
    census_pa, census_area = 800 / 1790, 1790.0
    s = frame([("uv", "uv", "uv", 40), ("uv", "uv", "other", 10), ("other", "other", "other", 40)])
    wald = stratified_estimates(s, sizes, classes=["uv", "other"], fpc=False, interval="wald")
    assert wald.producers_accuracy["uv"].ci95 == (1.0, 1.0)  # the degenerate classical interval
    r = stratified_estimates(s, sizes, classes=["uv", "other"], fpc=False)
    for est in [r.overall_accuracy, *r.users_accuracy.values(), *r.producers_accuracy.values(), *r.area.values()]:
        lo, hi = est.ci95
        assert hi - lo > 0 and lo <= est.estimate <= hi, est
    pa, area = r.producers_accuracy["uv"], r.area["uv"]
    assert pa.estimate == 1.0 and pa.se == 0.0  # the point estimate and SE stay classical
    assert pa.ci95[0] < census_pa < pa.ci95[1]
    assert area.ci95[0] < census_area < area.ci95[1]
    ratio = area_ratio_estimates(s.assign(ref_land=s["ref_class"]), sizes, ["uv"], ["uv", "other"], "ref_land", fpc=False)
    assert ratio.ratio.ci95[1] - ratio.ratio.ci95[0] > 0


def test_posterior_bounds_take_a_batch_of_samples():
    """The benchmark's path: a batch of count cubes gives each sample's bounds (up to Monte Carlo noise)."""
    rng = np.random.default_rng(3)
    counts = np.stack([np.stack([np.diag(rng.integers(5, 30, 2)) for _ in range(3)]) for _ in range(4)])
    counts[:, 0, 0, 1] = rng.integers(0, 5, 4)
    size = np.array([10.0, 300.0, 50.0])
    _, y, x = accuracy_indicators(2)
    lo, hi = posterior_bounds(counts, size, y, x)
    assert lo.shape == hi.shape == (4, y.shape[0]) and np.all(lo <= hi)
    for b in range(4):
        lo1, hi1 = posterior_bounds(counts[b], size, y, x)
        tolerance = 0.1 * (hi1 - lo1)  # 4000 draws: the quantiles move by a few % of the width between streams
        assert np.all(np.abs(lo1 - lo[b]) < tolerance) and np.all(np.abs(hi1 - hi[b]) < tolerance)
    # a stratum without samples: no interval
    empty = counts[0].copy()
    empty[1] = 0
    assert np.isnan(posterior_bounds(empty, size, y, x)[0]).all()


# ------------------------------------------------------------------------------------------------------------
# sample design


def test_sample_size_overall_by_hand():
    # Olofsson et al. 2014, section 5.1.1: W = (0.02, 0.015, 0.32, 0.645), U = (0.7, 0.6, 0.9, 0.95), S(O) = 0.01
    s = (0.02 * math.sqrt(0.7 * 0.3) + 0.015 * math.sqrt(0.6 * 0.4) + 0.32 * math.sqrt(0.9 * 0.1)
         + 0.645 * math.sqrt(0.95 * 0.05))
    n = sample_size_overall({"a": 0.02, "b": 0.015, "c": 0.32, "d": 0.645},
                            {"a": 0.7, "b": 0.6, "c": 0.9, "d": 0.95}, 0.01)
    assert n == math.ceil((s / 0.01) ** 2) == 641
    # areas instead of shares give the same answer
    assert sample_size_overall({"uv": 5, "other": 95}, {"uv": 0.7, "other": 0.95}, 0.02) == math.ceil(
        ((0.05 * math.sqrt(0.21) + 0.95 * math.sqrt(0.95 * 0.05)) / 0.02) ** 2)
    with pytest.raises(ValueError, match="anticipated"):
        sample_size_overall({"uv": 1}, {}, 0.01)
    with pytest.raises(ValueError, match="target_se"):
        sample_size_overall({"uv": 1}, {"uv": 0.9}, 0)


def test_allocate_minimums_totals_and_proportion():
    sizes = {"n_uv": 2.0, "n_other": 48.0, "s_uv": 1.0, "s_other": 49.0}
    a = allocate(sizes, 400, min_per_stratum=50)
    assert sum(a.values()) == 400 and a["n_uv"] == 50 and a["s_uv"] == 50
    # the rest (300) is proportional to size among the strata above their minimum: 300 * 48/97, 300 * 49/97
    assert a == {"n_uv": 50, "n_other": 148, "s_uv": 50, "s_other": 152}  # 148.45 -> 148, 151.55 -> 152
    # asking for less than the minimums gives the minimums
    assert allocate(sizes, 10, min_per_stratum=50) == dict.fromkeys(sizes, 50)
    # per-stratum minimums (strata not named: 0) and capacity
    a = allocate(sizes, 100, min_per_stratum={"n_uv": 30}, capacity={"s_uv": 3})
    assert sum(a.values()) == 100 and a["n_uv"] == 30 and a["s_uv"] <= 3
    assert allocate({"a": 1, "b": 1}, 5, min_per_stratum=50, capacity={"a": 3, "b": 4}) == {"a": 3, "b": 4}
    with pytest.raises(ValueError, match="can hold"):
        allocate({"a": 1, "b": 1}, 10, min_per_stratum=0, capacity={"a": 3, "b": 4})
    with pytest.raises(ValueError, match="> 0"):
        allocate({"a": 0, "b": 1}, 10)


def test_allocate_rounding_is_deterministic_with_ties_by_name():
    assert allocate({"c": 1, "b": 1, "a": 1}, 100, min_per_stratum=0) == {"c": 33, "b": 33, "a": 34}
    assert allocate({"c": 1, "b": 1, "a": 1}, 101, min_per_stratum=0) == {"c": 33, "b": 34, "a": 34}
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 7))
        sizes = {f"s{i}": float(rng.random() * 100 + 0.01) for i in range(k)}
        mins = {h: int(rng.integers(0, 20)) for h in sizes}
        n = int(rng.integers(0, 300))
        a = allocate(sizes, n, mins)
        assert sum(a.values()) == max(n, sum(mins.values()))
        assert all(a[h] >= mins[h] for h in sizes)
        assert a == allocate(sizes, n, mins)


# ------------------------------------------------------------------------------------------------------------
# the file entry point


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_assess_table_writes_r_json(tmp_path: Path):
    samples, sizes = stehman_example()
    s_csv = tmp_path / "S.csv"
    samples.assign(id=range(len(samples))).to_csv(s_csv, index=False)
    t_csv = write(tmp_path / "T.csv", "stratum,size\n" + "".join(f"{h},{v}\n" for h, v in sizes.items()))
    out = tmp_path / "out" / "R.json"
    r = assess_table(s_csv, t_csv, out, fpc=False)
    doc = json.loads(out.read_text())
    assert doc == json.loads(json.dumps(r.to_json()))
    assert doc["estimator"] == "stehman2014" and doc["n"] == 40 and doc["classes"] == list("ABCD")
    assert set(doc["overall_accuracy"]) == {"estimate", "se", "ci95"}
    assert set(doc["area"]) == set("ABCD") and doc["area"]["A"]["estimate"] == pytest.approx(0.35 * 100000)
    assert [p.name for p in out.parent.iterdir()] == ["R.json"]  # no temporary left behind
    same(r, stratified_estimates(samples, sizes, classes=list("ABCD"), fpc=False))
    assert read_strata_csv(t_csv) == {k: float(v) for k, v in sizes.items()}
    assert list(read_samples_csv(s_csv).index[:2]) == [2, 3]  # index = line number


GOOD_S = "stratum,map_class,ref_class\na,uv,uv\na,uv,other\nb,other,other\nb,other,uv\n"
GOOD_T = "stratum,size\na,100\nb,900\n"


@pytest.mark.parametrize("samples, strata, where, what", [
    ("stratum,map_class\na,uv\n", GOOD_T, "S.csv: line 1", "missing column(s) ['ref_class']"),
    (GOOD_S, "stratum,area\na,100\n", "T.csv: line 1", "missing column(s) ['size']"),
    ("", GOOD_T, "S.csv", "empty"),
    (GOOD_S, "stratum,size\n", "T.csv", "no rows"),
    (GOOD_S + "c,uv,uv\n", GOOD_T, "S.csv: line 6", "stratum 'c' is not in"),
    (GOOD_S, "stratum,size\na,100\nb,0\n", "T.csv: line 3", "size '0' of stratum 'b' is not a number > 0"),
    (GOOD_S, "stratum,size\na,-5\nb,900\n", "T.csv: line 2", "is not a number > 0"),
    (GOOD_S, "stratum,size\na,100\nb,lots\n", "T.csv: line 3", "'lots'"),
    (GOOD_S, "stratum,size\na,100\nb,900\na,5\n", "T.csv: line 4", "listed again (first on line 2)"),
    (GOOD_S, GOOD_T + "c,50\n", "T.csv: line 4", "stratum 'c' has no samples"),
    ("stratum,map_class,ref_class\na,uv,uv\na,,other\n", GOOD_T, "S.csv: line 3", "map_class is empty"),
    (GOOD_S.replace("b,other,uv", "b,other,forest"), GOOD_T, "S.csv: line 5", "'forest' is not one of the classes"),
    (GOOD_S, "stratum,size\na,1\nb,900\n", "T.csv: line 2", "--no-fpc"),
])
def test_assess_table_bad_inputs_name_file_and_line(tmp_path: Path, samples: str, strata: str, where: str, what: str):
    s_csv, t_csv = write(tmp_path / "S.csv", samples), write(tmp_path / "T.csv", strata)
    with pytest.raises(AccuracyInputError) as err:
        assess_table(s_csv, t_csv, tmp_path / "R.json", classes=["uv", "other"])
    assert where in str(err.value) and what in str(err.value), str(err.value)
    assert not (tmp_path / "R.json").exists()


def test_assess_table_missing_file(tmp_path: Path):
    with pytest.raises(AccuracyInputError, match="no such file"):
        assess_table(tmp_path / "nope.csv", write(tmp_path / "T.csv", GOOD_T), tmp_path / "R.json")
