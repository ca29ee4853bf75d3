"""The labelling page in headless Chromium: label by keyboard, reload, find every answer kept, nothing from outside.

The run is the demo cities "mapped" by their own truth (class.tif = truth.tif) and assessed without the catalog
reference, so every sample point waits for a person and the chips show the synthetic imagery.

``GEOLINK_DOCS_IMG=1`` also writes the README's picture, docs/img/label.png (1280 x 800, under 300 KB).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from engine.accuracy.assess import AssessConfig, run_assess
from engine.accuracy.sampling import SampleConfig
from engine.catalog import load_catalog
from engine.schema import LANDUSE_CLASSES
from engine.web.label import LabelStore, make_label_server
from tests.browser import (
    chromium,
    label_settled,
    label_state,
    network_requests,
    outside_localhost,
    press,
    screenshot,
    serving,
    wait_for,
)

RUN = "demo-labels"
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "label.png"
KEYS = ["1", "b", "3", "u", "o"]  # urban_village, built_up, other, urban_village, other
EXPECTED = ["urban_village", "built_up", "other", "urban_village", "other"]


@pytest.fixture(scope="module")
def demo_run(demo_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """``(products/<run>, catalog rows)`` of a run whose sample waits for labels."""
    ws = tmp_path_factory.mktemp("label-browser")
    catalog = load_catalog(demo_workspace / "catalog.yaml")
    products = ws / "products" / RUN
    for row in catalog.to_pylist():
        (products / "cities" / row["city"]).mkdir(parents=True)
        shutil.copy(Path(row["imagery"]).with_name("truth.tif"), products / "cities" / row["city"] / "class.tif")
    (products / "run.json").write_text(json.dumps({"run": RUN, "model_version": "truth", "classes": list(LANDUSE_CLASSES)}))
    cfg = AssessConfig(sampling=SampleConfig(min_rare=5, min_common=5, n_total=40, seed=3), use_catalog_reference=False,
                       census=False)
    assert run_assess(ws, RUN, catalog, cfg).status == "awaiting_labels"
    return products, catalog.to_pylist()


def test_label_by_keyboard_and_resume_after_reload(demo_run) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    products, rows = demo_run
    shutil.rmtree(products / "accuracy" / "labels", ignore_errors=True)
    server = make_label_server(products, rows)
    store: LabelStore = server.label_app.store
    ids = store.ids
    with serving(server) as base, chromium(width=1280, height=800) as driver:
        driver.get(base + "/?labeller=alice")
        wait_for(lambda: label_settled(driver), 30, "the page to load the sample")
        assert label_state(driver, "index") == 0 and label_state(driver, "total") == len(ids) == 40
        wait_for(lambda: driver.execute_script("return document.getElementById('chip').naturalWidth"), 20, "the chip")
        for k, key in enumerate(KEYS):
            if k == 2:
                press(driver, "s")  # unsure, taken with the class
            press(driver, key)
            wait_for(lambda k=k: label_state(driver, "index") == k + 1, 10, f"the page to move on after key {key!r}")
        wait_for(lambda: label_settled(driver) and label_state(driver, "labelled") == 5, 20, "five saves")
        assert "5 of 40 labelled" in driver.find_element(By.ID, "progress").text
        assert not label_state(driver, "error")

        saved = pd.read_csv(products / "accuracy" / "labels" / "alice.csv", dtype=str, keep_default_na=False)
        assert saved["id"].tolist() == ids[:5] and saved["label"].tolist() == EXPECTED
        assert saved["unsure"].tolist() == ["no", "no", "yes", "no", "no"]

        driver.refresh()  # nothing lives only in the page
        wait_for(lambda: label_settled(driver) and label_state(driver, "labelled") == 5, 30, "the page to reload")
        assert label_state(driver, "index") == 5  # resumes at the first unlabelled point
        answers = label_state(driver, "answers")
        assert [answers[i]["label"] for i in ids[:5]] == EXPECTED and answers[ids[2]]["unsure"]
        press(driver, Keys.ARROW_LEFT)
        wait_for(lambda: label_state(driver, "index") == 4, 10, "ArrowLeft")
        chosen = driver.find_elements(By.CSS_SELECTOR, ".cls.chosen")
        assert [b.get_attribute("data-class") for b in chosen] == [EXPECTED[4]]

        # a comment on a labelled point is saved too
        press(driver, "c")
        press(driver, "mixed roofs")
        press(driver, Keys.ENTER)
        wait_for(lambda: label_settled(driver) and store.answers("alice")[ids[4]].comment == "mixed roofs", 10, "the comment")

        # a second labeller: the agreement panel appears with kappa and its interval
        for k, pid in enumerate(ids[:5]):
            store.save("bob", pid, EXPECTED[k] if k != 1 else "other")
        driver.refresh()
        wait_for(lambda: label_settled(driver) and "κ =" in driver.find_element(By.ID, "agreement-body").text, 20,
                 "the agreement panel")
        assert "of 5 points" in driver.find_element(By.ID, "agreement-body").text
        assert label_state(driver, "index") == 5
        wait_for(lambda: driver.execute_script("const c = document.getElementById('chip'), x = document.getElementById('context');"
                                               "return c.complete && c.naturalWidth > 0 && x.complete && x.naturalWidth > 0"),
                 20, "the views")

        requests = network_requests(driver)
        assert any("/chip/" in u for u in requests) and any("/api/labels" in u for u in requests)
        assert outside_localhost(requests) == []
        screenshot(driver, "label")
        if os.environ.get("GEOLINK_DOCS_IMG"):
            press(driver, Keys.ARROW_LEFT)  # a labelled point, its class and comment shown
            wait_for(lambda: label_state(driver, "index") == 4, 10, "ArrowLeft")
            save_readme_picture(driver, DOCS_IMG)


def save_readme_picture(driver, path: Path) -> Path:
    """The page as it is now in a 1280 x 800 viewport, quantised to 256 colours by octree (a third of the bytes;
    median cut would blur the class colours), for the README."""
    from PIL import Image

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1,
                                                                 "mobile": False})
    wait_for(lambda: driver.execute_script("const c = document.getElementById('chip'), x = document.getElementById('context');"
                                           "return c.complete && c.naturalWidth > 0 && x.complete && x.naturalWidth > 0"),
             20, "the views")
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    assert shot.size == (1280, 800) and path.stat().st_size < 300_000, (shot.size, path.stat().st_size)
    return path
