"""Held-out calibration of regression bundles (engine.training.calibration): the interval arithmetic covers what it
claims, refuses to pretend with fewer than two held-out cities, and the record is read from prepared tiles the way
training reads them. (`finetune --task population` writing calibration.json: tests/test_regression.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from engine.training.calibration import (CALIBRATION, core_bounds, heldout_calibration, interval, prediction_factors,
                                         read_calibration, share_factors, write_calibration)


def _doc(truth, pred, uv_truth=None, uv_pred=None, uv_tiles=None) -> dict:
    n = len(truth)
    uv_truth, uv_pred, uv_tiles = uv_truth or [None] * n, uv_pred or [None] * n, uv_tiles or [None] * n
    return {"cities": [{"city": f"c{i}", "region": "r", "tiles": 10, "truth": t, "pred": p, "uv_tiles": k, "uv_truth": ut,
                        "uv_pred": up} for i, (t, p, ut, up, k) in enumerate(zip(truth, pred, uv_truth, uv_pred, uv_tiles))]}


def test_the_95_percent_interval_covers_a_new_citys_truth_95_percent_of_the_time():
    """Measured coverage: 2000 trials of m=5 held-out cities with lognormal truth/prediction ratios (a biased model:
    mu != 0) and one new city; the interval from the five must hold the new city's truth ~95% of the time."""
    rng = np.random.default_rng(20240601)
    mu, sigma, m, trials = 0.15, 0.35, 5, 2000
    covered = 0
    for _ in range(trials):
        pred = rng.lognormal(10.0, 1.0, m)  # cities of very different sizes: ratios, not differences, carry over
        truth = pred * np.exp(rng.normal(mu, sigma, m))
        factors = prediction_factors(_doc(list(truth), list(pred)), level=0.95)
        assert factors is not None and factors[2] == m
        new_pred = float(rng.lognormal(10.0, 1.0))
        new_truth = new_pred * math.exp(rng.normal(mu, sigma))
        lo, hi = interval(new_pred, factors)
        covered += lo <= new_truth <= hi
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def test_more_cities_summed_give_a_narrower_interval_and_the_level_is_honoured():
    doc = _doc([90.0, 120.0, 100.0, 80.0, 115.0], [100.0] * 5)
    one, three = prediction_factors(doc), prediction_factors(doc, n_cities=3)
    assert three[0] > one[0] and three[1] < one[1]
    eighty = prediction_factors(doc, level=0.8)
    assert one[0] < eighty[0] < 1.0 < eighty[1] < one[1]
    with pytest.raises(ValueError, match="kind"):
        prediction_factors(doc, kind="villages")


def test_fewer_than_two_held_out_cities_give_no_interval():
    assert prediction_factors(_doc([], [])) is None
    assert prediction_factors(_doc([100.0], [90.0])) is None
    assert prediction_factors(_doc([100.0, 0.0], [90.0, 50.0])) is None  # a zero total is left out: one city is left
    assert share_factors(_doc([100.0, 120.0], [90.0, 100.0])) is None  # no UV totals at all
    assert interval(1234.0, None) == pytest.approx((math.nan, math.nan), nan_ok=True)
    assert all(math.isnan(v) for v in interval(math.nan, (0.8, 1.2, 5)))


def test_the_uv_variant_skips_cities_without_uv_tiles():
    doc = _doc([100.0, 200.0, 300.0, 400.0, 500.0], [110.0, 190.0, 310.0, 380.0, 520.0],
               uv_truth=[40.0, 999.0, 60.0, 0.0, 55.0], uv_pred=[50.0, 1.0, 50.0, 0.0, 60.0], uv_tiles=[3, 0, 4, 0, None])
    lo, hi, m = prediction_factors(doc, kind="uv")
    assert m == 2  # c1 (no UV tile, whatever its sums say), c3 (none, zero sums) and c4 (no reference) left out
    r = np.log([40.0 / 50.0, 60.0 / 50.0])
    from scipy.stats import t

    half = t.ppf(0.975, 1) * r.std(ddof=1) * math.sqrt(1 + 1 / 2)
    assert (lo, hi) == pytest.approx((math.exp(r.mean() - half), math.exp(r.mean() + half)))
    # the share: d = r_uv - r_all over the same two cities
    s_lo, s_hi, s_m = share_factors(doc)
    d = r - np.log([100.0 / 110.0, 300.0 / 310.0])
    half = t.ppf(0.975, 1) * d.std(ddof=1) * math.sqrt(1 + 1 / 2)
    assert s_m == 2 and (s_lo, s_hi) == pytest.approx((math.exp(d.mean() - half), math.exp(d.mean() + half)))


def test_calibration_json_round_trips(tmp_path):
    assert read_calibration(tmp_path) is None
    doc = {"version": 1, "target": "population", "cities": _doc([1.0, 2.0], [1.5, 2.5])["cities"]}
    path = write_calibration(tmp_path, doc)
    assert path.name == CALIBRATION and read_calibration(tmp_path) == doc
    assert [p.name for p in tmp_path.iterdir()] == [CALIBRATION]  # no temporary file left behind
    path.write_text("[1, 2]")
    from engine.model_bundle import BundleError

    with pytest.raises(BundleError, match="not a JSON object"):
        read_calibration(tmp_path)


def test_heldout_calibration_reads_a_val_city_as_training_does(prepared_demo, tmp_path):
    """An untrained regression bundle on the demo's val city: one row with the city's tiles; the truth is the
    raster's total (tile cores partition the city); UV totals are a part of the city's."""
    import torch

    from engine.model_bundle import write_bundle
    from geolink_model import build_model, create_config

    ws, catalog = prepared_demo
    rows = catalog.to_pylist()
    val = [r for r in rows if r.get("split") == "val"]
    assert val, "the demo catalog has a val city"
    torch.manual_seed(0)
    bundle = tmp_path / "pop"
    write_bundle(bundle, build_model(create_config("test", regression_targets=1)),
                 train={"task": "finetune", "target": "population", "mode": "fused", "log_target": True, "classes": "builtup"})
    doc = heldout_calibration(bundle, ws, [r["city"] for r in val], {r["city"]: r["population"] for r in val},
                              {r["city"]: r.get("reference") for r in rows}, {r["city"]: r.get("region") for r in rows},
                              batch_size=8, name="pop")
    json.dumps(doc, allow_nan=False)  # plain JSON
    assert {k: doc[k] for k in ("version", "target", "units", "method", "uv_min_fraction")} == {
        "version": 1, "target": "population", "units": "residents", "method": "held-out city ratios", "uv_min_fraction": 0.0}
    assert doc["model_version"].startswith("pop-")
    [city] = doc["cities"]
    assert city["city"] == val[0]["city"] and city["region"] == val[0]["region"]
    index = pq.read_table(next(ws.glob(f"tiles/city={city['city']}/index/*.parquet"))).to_pylist()
    assert 0 < city["tiles"] <= len(index)
    with rasterio.open(val[0]["population"]) as src:
        total = float(src.read(1, masked=True).filled(0).sum())
    assert city["truth"] == pytest.approx(total, rel=0.02) and city["pred"] > 0
    assert 0 <= city["uv_tiles"] <= city["tiles"] and 0 <= city["uv_truth"] <= city["truth"]
    r = index[0]
    minx, miny, maxx, maxy = core_bounds(r)
    assert r["minx"] <= minx < maxx <= r["maxx"] and r["miny"] <= miny < maxy <= r["maxy"]
