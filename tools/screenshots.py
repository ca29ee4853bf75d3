"""Make the README's pictures of `serve` (the map), `status` and `label` from a finished demo run, in headless Chromium.

    .venv/bin/python tools/screenshots.py [--workspace geolink-data] [--run default] [--city wuhan]

Writes docs/img/map.png (a city zoomed, one village's popup open), docs/img/status.png (the `status` table, as the
terminal shows it) and docs/img/label.png (the labelling page on the run's accuracy sample). Needs the browser of
the tests (tools/ensure-browser) and the dev extras (selenium).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import chromium, serving, wait_for  # noqa: E402

IMG = REPO / "docs" / "img"


def map_picture(driver, products: Path, city: str) -> Path:
    import geopandas as gpd
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from engine.web.server import make_server

    with serving(make_server(products)) as base:
        driver.get(base + "/map.html")
        wait_for(lambda: driver.execute_script("return window.geolinkMap && window.geolinkMap.ready"), 60, "the map")
        driver.find_element(By.CSS_SELECTOR, f'#cities li[data-city="{city}"]').click()
        wait_for(lambda: driver.execute_script("const s = window.geolinkMap, m = s.map; return m.loaded() && !m.isMoving() && s.rendered()"),
                 30, "villages")
        villages = gpd.read_parquet(products / "urban_villages.parquet")
        village = villages[villages["city"] == city].sort_values("area_m2").iloc[-1]
        inside = village.geometry.point_on_surface()
        x, y = driver.execute_script("const p = window.geolinkMap.map.project([arguments[0], arguments[1]]); return [p.x, p.y]",
                                     inside.x, inside.y)
        canvas = driver.find_element(By.CSS_SELECTOR, "#map canvas")
        ActionChains(driver).move_to_element_with_offset(canvas, x - canvas.rect["width"] / 2, y - canvas.rect["height"] / 2).click().perform()
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".maplibregl-popup-content"), 10, "the popup")
        return _save(driver, "map.png")


def status_picture(driver, workspace: Path, run: str) -> Path:
    from rich.console import Console
    from rich.text import Text

    cli = Path(sys.executable).with_name("geolink-engine")
    out = subprocess.run([str(cli), "--workspace", str(workspace), "status", "--run", run], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "110", "FORCE_COLOR": "1", "TERM": "xterm-256color"}, check=True)
    console = Console(record=True, width=110, file=open(os.devnull, "w"), force_terminal=True)  # noqa: SIM115
    console.print(Text.from_ansi(f"$ geolink-engine status --run {run}\n" + out.stdout))
    driver.set_window_size(800, 480)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "status.html"
        console.save_html(str(page), inline_styles=True)
        driver.get(page.as_uri())
        driver.execute_script("document.body.style.background = '#1d1f21'; document.body.style.color = '#e0e0e0';")
        return _save(driver, "status.png")


def _save(driver, name: str) -> Path:
    import io

    from PIL import Image

    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / name
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # a third of the bytes
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="geolink-data")
    parser.add_argument("--run", default="default")
    parser.add_argument("--city", default="wuhan")
    args = parser.parse_args()
    workspace = Path(args.workspace).resolve()
    products = workspace / "products" / args.run
    with chromium(width=1280, height=800) as driver:
        map_picture(driver, products, args.city)
        status_picture(driver, workspace, args.run)
    try:
        from engine.web.label import screenshot_label_page  # the labelling page's own picture (engine.web.label)
    except ImportError:
        return
    screenshot_label_page(workspace, args.run, IMG / "label.png")


if __name__ == "__main__":
    main()
