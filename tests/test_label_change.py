"""`geolink-engine label` on a change run: both dates side by side, the four change classes, and an export that the
change assessment (engine.accuracy.change.run_change_assess) takes.

The run is made by hand: ``cities/<city>/change.tif`` written directly (codes 0-3 in blocks, 255 nodata rows),
``run.json`` of kind ``change`` and two images per city (the before one red, the after one blue), assessed without
references so every sample point waits for a person.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from engine.accuracy.change import ChangeAssessConfig, run_change_assess
from engine.accuracy.reference import read_labels
from engine.change.codes import CHANGE_CLASSES
from engine.web import label as label_mod
from engine.web.label import (
    LabelFileError,
    LabelInputError,
    LabelStore,
    export_reference,
    kappa_interval,
    make_label_server,
    run_kind,
    run_vintages,
)
from tests.browser import chromium, label_settled, label_state, network_requests, outside_localhost, press, screenshot, serving, wait_for
from tests.test_label import _post, _request

RUN = "m2018-to-m2024"
VINTAGES = ("2018", "2024")
REGION = "zone-q"  # must never reach the browser
EPSG = 32650
SIZE = 100  # pixels of 2 m
CITIES = ("alpha", "beta")
BEFORE_RGB, AFTER_RGB = (200, 40, 40), (40, 60, 200)
CFG = ChangeAssessConfig(n_total=24, min_rare=4, min_common=4, seed=5, chip_px=32, census=False)


def _codes() -> np.ndarray:
    """Other top left, persistent top right, demolished bottom left, new bottom right; the last rows nodata."""
    codes = np.zeros((SIZE, SIZE), np.uint8)
    codes[:50, 50:] = 1
    codes[50:, :50] = 2
    codes[50:, 50:] = 3
    codes[-6:] = 255
    return codes


def _image(path: Path, transform, rgb: tuple[int, int, int], seed: int) -> str:
    noise = np.random.default_rng(seed).integers(-20, 21, size=(3, SIZE, SIZE))
    data = np.clip(np.array(rgb).reshape(3, 1, 1) + noise, 0, 255).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs=f"EPSG:{EPSG}",
                       transform=transform) as dst:
        dst.write(data)
    return str(path)


def _change_run(root: Path) -> tuple[Path, list[dict]]:
    """``products/<RUN>`` (change maps and run.json) and the cities' rows for ``run_change_assess``."""
    products = root / "products" / RUN
    cities = []
    for i, city in enumerate(CITIES):
        transform = from_origin(500_000.0 + 2_000.0 * i, 3_400_000.0, 2.0, 2.0)
        folder = products / "cities" / city
        folder.mkdir(parents=True)
        with rasterio.open(folder / "change.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="uint8",
                           crs=f"EPSG:{EPSG}", transform=transform, nodata=255) as dst:
            dst.write(_codes(), 1)
        inputs = root / "inputs" / city
        inputs.mkdir(parents=True)
        cities.append({"city": city, "region": REGION, "reference_before": None, "reference_after": None,
                       "imagery_before": _image(inputs / f"{VINTAGES[0]}.tif", transform, BEFORE_RGB, 2 * i),
                       "imagery_after": _image(inputs / f"{VINTAGES[1]}.tif", transform, AFTER_RGB, 2 * i + 1)})
    (products / "run.json").write_text(json.dumps({
        "run": RUN, "kind": "change", "before": "m2018", "after": "m2024", "vintages": list(VINTAGES),
        "model_version": "truth", "classes": list(CHANGE_CLASSES), "datetime": "2024-06-01T00:00:00Z"}))
    return products, cities


def _rows(cities: list[dict], date: str) -> list[dict]:
    """Catalog-like rows (``city``, ``imagery``) of one date."""
    return [{"city": c["city"], "imagery": c[f"imagery_{date}"]} for c in cities]


@pytest.fixture(scope="module")
def change_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    products, cities = _change_run(tmp_path_factory.mktemp("label-change"))
    report = run_change_assess(products, cities, CFG)
    assert report.status == "awaiting_labels" and report.points["ref_class"].isna().all()
    return products, cities


@pytest.fixture
def products(change_run, tmp_path: Path) -> Path:
    """A private copy of the change run's products (each test writes its own labels)."""
    src, _ = change_run
    out = tmp_path / "products" / RUN
    shutil.copytree(src, out)
    return out


@pytest.fixture
def served(products: Path, change_run):
    _, cities = change_run
    server = make_label_server(products, _rows(cities, "before"), after_rows=_rows(cities, "after"))
    with serving(server) as base:
        yield server, base


def _mean_rgb(png: bytes) -> np.ndarray:
    """Mean colour of the imagery in a view (the black outside the raster and the yellow marks left out)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), float).reshape(-1, 3)
    keep = (rgb.sum(axis=1) > 30) & ~((rgb[:, 0] > 200) & (rgb[:, 1] > 200))
    assert keep.sum() > 100
    return rgb[keep].mean(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# the run's kind


def test_a_change_run_needs_both_dates(products: Path, change_run) -> None:
    _, cities = change_run
    assert run_vintages(products) == VINTAGES
    store = LabelStore(products)
    assert store.kind.is_change and store.classes == CHANGE_CLASSES and store.kind.vintages == VINTAGES
    with pytest.raises(ValueError, match=r"change run \(2018 -> 2024\): give the after date's catalog rows"):
        make_label_server(products, _rows(cities, "before"))
    # without run.json the sample's two-date columns tell; a run.json of a map run takes no after_rows
    manifest = (products / "run.json").read_text()
    (products / "run.json").unlink()
    assert run_vintages(products) is None and run_kind(products, store.sample).vintages == ("before", "after")
    (products / "run.json").write_text(json.dumps({"run": RUN, "model_version": "m"}))
    with pytest.raises(ValueError, match="is a map run .*after_rows are for a change run only"):
        make_label_server(products, _rows(cities, "before"), after_rows=_rows(cities, "after"))
    (products / "run.json").write_text(manifest)


def test_points_awaiting_labels_are_offered_and_map_classes_refused(products: Path) -> None:
    store = LabelStore(products)
    assert len(store.ids) == CFG.n_total and store.ids == sorted(store.ids)  # every point waits for a person
    with pytest.raises(LabelInputError, match="label 'urban_village' is not one of"):
        store.save("ann", store.ids[0], "urban_village")
    store.folder.mkdir(parents=True)
    (store.folder / "old.csv").write_text(f"id,label\n{store.ids[0]},built_up\n")  # a map run's labels file
    with pytest.raises(LabelFileError, match=r"old.csv: line 2: label 'built_up' .* not one of \['other', 'persistent_uv'"):
        store.answers("old")


def test_points_offered_are_those_no_reference_polygons_label() -> None:
    sample = pd.DataFrame({"id": ["p1", "p2", "p3", "p4"], "ref_source": ["reference", None, "labels", "reference"],
                           "ref_class": ["other", None, "new_uv", "persistent_uv"]})
    assert label_mod.points_to_label(sample)["id"].tolist() == ["p2", "p3"]  # awaiting, and labelled by people
    every = sample.assign(ref_source="reference")
    assert label_mod.points_to_label(every)["id"].tolist() == ["p1", "p2", "p3", "p4"]  # a check of the references
    assert label_mod.points_to_label(sample.drop(columns="ref_source"))["id"].tolist() == ["p2"]


# ---------------------------------------------------------------------------------------------------------------
# HTTP


def test_http_blind_two_dates_and_change_classes(served) -> None:
    server, base = served
    status, _, body = _request(base + "/api/samples")
    assert status == 200
    doc = json.loads(body)
    assert doc["kind"] == "change" and doc["vintages"] == list(VINTAGES) and doc["classes"] == list(CHANGE_CLASSES)
    assert [(b["class"], b["keys"][0]) for b in doc["buttons"]] == list(zip(CHANGE_CLASSES, "1234"))
    assert "a village at the first date, gone at the second" in doc["buttons"][2]["help"]
    assert all(set(p) == {"id", "city", "lon", "lat", "note"} and p["note"] == "" for p in doc["points"])
    text = body.decode()
    for hidden in ("map_class", "stratum", "ref_", "region", REGION):
        assert hidden not in text, f"{hidden!r} reaches the browser"
    pid = doc["points"][0]["id"]
    size = label_mod.CHIP_PX
    chips = {}
    for view, side in (("chip", size), ("chip-after", size), ("context", label_mod.CONTEXT_PX),
                       ("context-after", label_mod.CONTEXT_PX)):
        status, _, png = _request(f"{base}/{view}/{pid}.png")
        assert status == 200 and Image.open(io.BytesIO(png)).size == (side, side), view
        chips[view] = _mean_rgb(png)
    for view in ("chip", "context"):  # the before date red, the after date blue
        assert chips[view][0] > chips[view][2] + 60 and chips[f"{view}-after"][2] > chips[f"{view}-after"][0] + 60
    for path in (f"/chip-before/{pid}.png", f"/chip-later/{pid}.png", "/chip-after/p99999.png", "/context-/x.png"):
        assert _request(base + path)[0] == 404, path


def test_label_all_export_and_the_change_assessment_takes_it(served, products: Path, change_run) -> None:
    server, base = served
    store: LabelStore = server.label_app.store
    version = json.loads(_request(base + "/api/samples")[2])["version"]
    map_class = dict(zip(store.sample["id"], store.sample["map_class"]))
    for k, pid in enumerate(store.ids):  # the map's class, except every fifth point
        label = map_class[pid] if k % 5 else CHANGE_CLASSES[(CHANGE_CLASSES.index(map_class[pid]) + 1) % 4]
        status, _, body = _post(base, "/api/labels", {"labeller": "ann", "id": pid, "label": label, "version": version,
                                                   "unsure": k == 3})
        assert status == 200, body
    assert json.loads(body)["labelled"] == len(store.ids)
    for bad in ("urban_village", "built_up", "demolished", "", None, 3):
        status, _, body = _post(base, "/api/labels", {"labeller": "ann", "id": store.ids[0], "label": bad})
        assert status == 400 and "is not one of" in json.loads(body)["error"], bad
    assert store.answers("ann")[store.ids[0]].label in CHANGE_CLASSES  # the refused ones changed nothing

    # kappa over the four classes
    for k, pid in enumerate(store.ids):
        store.save("bo", pid, map_class[pid] if k % 4 else CHANGE_CLASSES[0])
    agreement = json.loads(_request(base + "/api/agreement?a=ann&b=bo")[2])
    assert agreement["classes"] == list(CHANGE_CLASSES) and np.array(agreement["table"]).shape == (4, 4)
    assert agreement["n"] == len(store.ids) and agreement["kappa_lo"] <= agreement["kappa"] <= agreement["kappa_hi"] < 1

    status, _, body = _post(base, "/api/export", {"labeller": "ann"})
    assert status == 200, body
    path = Path(json.loads(body)["path"])
    assert path == products / "accuracy" / "labels" / "ann.reference.csv"
    labels = read_labels(path, store.sample, classes=CHANGE_CLASSES)
    assert len(labels) == len(store.ids) and set(labels["ref_land"]) <= set(CHANGE_CLASSES)

    _, cities = change_run
    done = run_change_assess(products, cities, CFG, reference_labels=path)
    assert done.status == "done" and (done.points["ref_source"] == "labels").all()
    assert done.national.status == "estimated"
    # the rewritten sample offers the same points: the labels files stay valid and the export can be redone
    again = LabelStore(products)
    assert again.ids == store.ids and again.version == store.version and len(again.answers("ann")) == len(store.ids)
    assert export_reference(products, "ann") == path


def test_a_date_without_imagery_says_which(products: Path, change_run) -> None:
    _, cities = change_run
    after = [{**r, "imagery": str(products / "gone.tif")} if r["city"] == "beta" else r for r in _rows(cities, "after")]
    server = make_label_server(products, _rows(cities, "before"), after_rows=after)
    with serving(server) as base:
        points = json.loads(_request(base + "/api/samples")[2])["points"]
        beta = next(p for p in points if p["city"] == "beta")
        alpha = next(p for p in points if p["city"] == "alpha")
        assert alpha["note"] == "" and beta["note"].startswith("after (2024): no imagery") and "gone.tif" in beta["note"]
        status, _, png = _request(f"{base}/chip-after/{beta['id']}.png")  # a placeholder, not an error
        assert status == 200 and Image.open(io.BytesIO(png)).size[0] > 0
        assert _request(f"{base}/chip/{beta['id']}.png")[0] == 200


def test_kappa_interval_covers_with_four_classes() -> None:
    """The interval's prior (mass 1 over the K x K table) with the four change classes, rare changes: the 95%
    interval covers the true kappa 90-99% of the time (300 replicates of n = 60; measured 92-96% at n = 30, 60 and
    200 over four such tables)."""
    p = np.array([[.70, .02, .01, .02], [.02, .15, .005, .005], [.01, .005, .03, 0], [.02, 0, 0, .03]])
    p /= p.sum()
    po, pe = np.trace(p), float(p.sum(0) @ p.sum(1))
    true_kappa = (po - pe) / (1 - pe)
    tables = np.random.default_rng(60).multinomial(60, p.ravel(), size=300).reshape(-1, 4, 4)
    hits = [lo <= true_kappa <= hi for lo, hi in (kappa_interval(t, draws=2000) for t in tables)]
    assert 0.90 <= np.mean(hits) <= 0.99, np.mean(hits)


# ---------------------------------------------------------------------------------------------------------------
# the page in headless Chromium

KEYS = ["1", "2", "3", "4"]


VIEWS_LOADED = ("return ['chip', 'chip-after', 'context', 'context-after'].every((id) => {"
                "const el = document.getElementById(id); return el.complete && el.naturalWidth > 0; })")


def test_page_shows_both_dates_and_labels_by_keys(products: Path, change_run) -> None:
    from selenium.webdriver.common.by import By

    _, cities = change_run
    server = make_label_server(products, _rows(cities, "before"), after_rows=_rows(cities, "after"))
    ids = server.label_app.store.ids
    with serving(server) as base, chromium(width=1280, height=800) as driver:
        driver.get(base + "/?labeller=ann")
        wait_for(lambda: label_settled(driver), 30, "the page to load the sample")
        assert driver.execute_script("return document.body.dataset.kind") == "change"
        buttons = driver.find_elements(By.CSS_SELECTOR, "#classes .cls")
        assert [b.get_attribute("data-class") for b in buttons] == list(CHANGE_CLASSES)
        assert "Demolished UV" in buttons[2].text
        assert "gone at the second" in driver.find_element(By.ID, "help").text
        wait_for(lambda: driver.execute_script(VIEWS_LOADED), 20, "the four views")
        chip, chip_after = driver.find_element(By.ID, "chip"), driver.find_element(By.ID, "chip-after")
        assert chip.is_displayed() and chip_after.is_displayed()
        assert chip_after.rect["x"] > chip.rect["x"] + chip.rect["width"] - 1 and chip_after.rect["y"] == chip.rect["y"]
        context = driver.find_element(By.ID, "context")
        assert context.is_displayed() and context.rect["y"] > chip.rect["y"] + chip.rect["height"] - 1  # below
        assert driver.find_element(By.ID, "cap-chip").text.startswith("2018")
        assert driver.find_element(By.ID, "cap-chip-after").text.startswith("2024")

        for k, key in enumerate(KEYS):
            press(driver, key)
            wait_for(lambda k=k: label_state(driver, "index") == k + 1, 10, f"the page to move on after key {key!r}")
        wait_for(lambda: label_settled(driver) and label_state(driver, "labelled") == len(KEYS), 20, "the saves")
        assert not label_state(driver, "error")
        saved = pd.read_csv(products / "accuracy" / "labels" / "ann.csv", dtype=str, keep_default_na=False)
        assert saved["id"].tolist() == ids[:4] and saved["label"].tolist() == list(CHANGE_CLASSES)

        driver.refresh()  # nothing lives only in the page
        wait_for(lambda: label_settled(driver) and label_state(driver, "labelled") == len(KEYS), 30, "the page to reload")
        assert label_state(driver, "index") == len(KEYS)  # resumes at the first unlabelled point
        answers = label_state(driver, "answers")
        assert [answers[i]["label"] for i in ids[:4]] == list(CHANGE_CLASSES)
        wait_for(lambda: driver.execute_script(VIEWS_LOADED), 20, "the four views after the reload")
        requests = network_requests(driver)
        assert any("/chip-after/" in u for u in requests) and any("/context-after/" in u for u in requests)
        assert outside_localhost(requests) == []
        screenshot(driver, "label_change")
