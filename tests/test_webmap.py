"""The interactive map (``map.html``), the products server (``serve``) and their security, in a real browser.

The products folder is ``tests/test_products.make_products``: two cities with COGs in two UTM zones (imagery in
UTM and in EPSG:4326), one failed city, GeoParquet villages. The browser tests drive Debian's headless Chromium
(``tests/browser.py``): the map loads through ``serve``, the villages render, a click opens the village's popup,
and no request leaves localhost; both vector forms (GeoJSON per city, PMTiles by range requests) are opened.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import pytest

from engine.products import write_page
from engine.products.webmap import write_web_map
from engine.web.server import make_server, resolve_under
from tests.browser import chromium, network_requests, outside_localhost, screenshot, serving, wait_for
from tests.test_products import make_products

CLI = str(Path(sys.executable).with_name("geolink-engine"))  # the installed console script


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    products, rows = make_products(tmp_path_factory.mktemp("webmap"))
    write_web_map(products, rows)
    write_page(products, rows)  # after the map, so it links it
    return products, rows


def _get(base: str, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, headers=headers or {})  # the path goes on the wire as written (no client normalising)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


# --- the page's files ----------------------------------------------------------------------------------------------
def test_map_page_lists_cities_villages_and_overlays(site) -> None:
    products, _ = site
    html = (products / "map.html").read_text()
    manifest = json.loads(html.split('<script id="geolink-manifest" type="application/json">')[1].split("</script>")[0])
    assert manifest["vector"]["kind"] == "geojson" and set(manifest["vector"]["files"]) == {"alpha", "beta"}
    cities = {c["city"]: c for c in manifest["cities"]}
    assert set(cities) == {"alpha", "beta", "gamma"} and cities["gamma"]["failed"] and not cities["gamma"]["overlays"]
    for city in ("alpha", "beta"):
        overlays = cities[city]["overlays"]
        assert set(overlays) == {"probability", "imagery"}
        for overlay in overlays.values():
            assert (products / overlay["url"]).is_file()
            (w, n), (e, _), (_, s), _ = overlay["coordinates"]
            assert w < e and s < n
    villages = gpd.read_file(products / "web" / "uv" / "alpha.geojson")
    assert list(villages["uv_id"]) == ["alpha-1"] and villages.crs.to_epsg() == 4326
    assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html.replace("https://github.com", "")
    for name in ("maplibre-gl.js", "maplibre-gl.css", "pmtiles.js"):
        assert (products / "web" / "vendor" / name).stat().st_size > 10_000
    assert 'href="map.html"' in (products / "index.html").read_text()


def test_vendored_js_matches_its_record() -> None:
    """The JS shipped in the package is what tools/vendor-web copied from the npm registry (name, version, sha256)."""
    import hashlib

    vendor = Path(__file__).resolve().parents[1] / "engine" / "web" / "vendor"
    record = json.loads((vendor / "VENDOR.json").read_text())
    lock = json.loads((Path(__file__).resolve().parents[1] / "web" / "package-lock.json").read_text())
    for name, pkg in record["packages"].items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == pkg["version"]
        for file, digest in pkg["files"].items():
            assert hashlib.sha256((vendor / file).read_bytes()).hexdigest() == digest, file


def test_rewriting_the_map_keeps_files_and_switches_vector_form(site, tmp_path: Path) -> None:
    products, rows = make_products(tmp_path)
    write_web_map(products, rows)
    files = {p: p.stat().st_mtime_ns for p in (products / "web").rglob("*") if p.is_file()}
    page = (products / "map.html").stat().st_mtime_ns
    time.sleep(0.01)
    write_web_map(products, rows)
    assert {p: p.stat().st_mtime_ns for p in (products / "web").rglob("*") if p.is_file()} == files
    assert (products / "map.html").stat().st_mtime_ns == page
    write_web_map(products, rows, max_geojson_features=1)  # two villages: above the threshold, one PMTiles archive
    assert (products / "web" / "uv.pmtiles").stat().st_size > 0 and not (products / "web" / "uv").exists()
    assert not [p for p in (products / "web").rglob(".*")]  # no temporary file left


# --- the server ----------------------------------------------------------------------------------------------------
def test_server_refuses_every_path_out_of_the_products(site, tmp_path: Path) -> None:
    products, _ = site
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    (products / "web" / "leak").unlink(missing_ok=True)
    os.symlink(secret, products / "web" / "leak")
    (products / ".hidden.tmp").write_text("partial")
    try:
        with serving(make_server(products)) as base:
            assert _get(base, "/map.html")[0] == 200
            for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/web/..%2f..%2fsecret.txt", "/web%2f..%2f..%2fsecret.txt",
                         "/..%5csecret.txt", "/web/leak", "/.hidden.tmp", "/%00", "/web/%ff", "/" + "/".join([".."] * 8) + "/etc/passwd"):
                status, _, body = _get(base, path)
                assert status == 404 and b"not for the browser" not in body, path
            status, _, body = _get(base, "/web/")  # a folder: no listing
            assert status == 404 and b"vendor" not in body
            assert _get(base, "/map.html", method="POST")[0] == 501
    finally:
        (products / "web" / "leak").unlink()
        (products / ".hidden.tmp").unlink()
    assert resolve_under(products, "/web/vendor/pmtiles.js") == (products / "web" / "vendor" / "pmtiles.js").resolve()


def test_server_answers_range_requests(site) -> None:
    products, _ = site
    data = (products / "web" / "vendor" / "pmtiles.js").read_bytes()
    with serving(make_server(products)) as base:
        status, headers, body = _get(base, "/web/vendor/pmtiles.js", {"Range": "bytes=10-19"})
        assert (status, body, headers["content-range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
        status, headers, body = _get(base, "/web/vendor/pmtiles.js", {"Range": "bytes=-7"})
        assert (status, body) == (206, data[-7:])
        status, headers, _ = _get(base, "/web/vendor/pmtiles.js", {"Range": f"bytes={len(data)}-"})
        assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
        status, headers, body = _get(base, "/web/vendor/pmtiles.js", {"Range": "bytes=0-1,5-6"})  # several: whole file
        assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
        status, headers, body = _get(base, "/web/vendor/pmtiles.js", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) == len(data)
        assert "default-src 'self'" in headers["content-security-policy"]


def test_server_binds_loopback_and_warns_for_another_host(site, caplog: pytest.LogCaptureFixture) -> None:
    products, _ = site
    server = make_server(products, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    with caplog.at_level(logging.WARNING, logger="engine.web"):
        server = make_server(products, host="0.0.0.0", port=0)
        server.server_close()
    assert any("0.0.0.0" in r.getMessage() for r in caplog.records)


def test_serve_command_serves_the_run(site) -> None:
    products, _ = site
    workspace = products.parents[1]
    proc = subprocess.Popen([CLI, "--workspace", str(workspace), "serve", "--run", "demo", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line
        url = line.split("http://")[1].split()[0]
        base = "http://" + url.split("/")[0]
        status, _, body = _get(base, "/map.html")
        assert status == 200 and b"geolink-manifest" in body
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([CLI, "--workspace", str(workspace), "serve", "--run", "../x"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not a valid slug" in bad.stdout + bad.stderr


# --- in the browser ------------------------------------------------------------------------------------------------
def _open_city_and_click(driver, base: str, products: Path, city: str) -> str:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.get(base + "/map.html")
    wait_for(lambda: driver.execute_script("return window.geolinkMap && (window.geolinkMap.ready || window.geolinkMap.error)"),
             60, "the map to load")
    assert driver.execute_script("return window.geolinkMap.error") is None
    driver.find_element(By.CSS_SELECTOR, f'#cities li[data-city="{city}"]').click()
    rendered = wait_for(lambda: driver.execute_script(
        "const s = window.geolinkMap, m = s.map; return m.loaded() && !m.isMoving() && s.rendered()"), 30, "villages to render")
    assert rendered >= 1
    village = gpd.read_parquet(products / "urban_villages.parquet").set_index("city").loc[city]
    inside = village.geometry.point_on_surface()
    x, y = driver.execute_script("const p = window.geolinkMap.map.project([arguments[0], arguments[1]]); return [p.x, p.y]",
                                 inside.x, inside.y)
    canvas = driver.find_element(By.CSS_SELECTOR, "#map canvas")
    ActionChains(driver).move_to_element_with_offset(canvas, x - canvas.rect["width"] / 2, y - canvas.rect["height"] / 2).click().perform()
    popup = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".maplibregl-popup-content"), 10, "the village popup")
    return popup[0].text


def test_map_in_a_browser_renders_villages_and_shows_attributes(site, tmp_path: Path) -> None:
    products, rows = site
    pm_products, pm_rows = make_products(tmp_path)
    write_web_map(pm_products, pm_rows, max_geojson_features=0)  # the PMTiles form, read by range requests
    with chromium() as driver:
        with serving(make_server(products)) as base:
            text = _open_city_and_click(driver, base, products, "alpha")
            screenshot(driver, "map_geojson")
            assert "alpha-1" in text and "mean probability" in text and "0.900" in text
            urls = network_requests(driver)
            assert any(u.endswith("/web/uv/alpha.geojson") for u in urls) and any("/web/prob/alpha.png" in u for u in urls)
            assert outside_localhost(urls) == []
        with serving(make_server(pm_products)) as base:
            text = _open_city_and_click(driver, base, pm_products, "beta")
            screenshot(driver, "map_pmtiles")
            assert "beta-1" in text
            urls = network_requests(driver)
            assert any(u.endswith("/web/uv.pmtiles") for u in urls)
            assert outside_localhost(urls) == []


def test_a_map_that_cannot_be_written_never_stops_the_products(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The web map is a view of the products: if it fails (a GDAL driver missing, a disk full of tiles), the page, the
    STAC and every product file are still written, the old map.html is removed, and a warning says why."""
    import pyarrow as pa

    import engine.products.webmap as webmap
    from engine.pipelines.publish import publish_products

    products, rows = make_products(tmp_path)
    (products / "map.html").write_text("stale")

    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(webmap, "write_web_map", broken)
    import engine.products.regions as regions  # this fixture has no morphology columns for the regional table

    monkeypatch.setattr(regions, "write_regions", lambda products_dir: (None, None))
    with caplog.at_level(logging.WARNING, logger="engine.publish"):
        publish_products(products, pa.Table.from_pylist(rows))
    assert (products / "index.html").is_file() and (products / "stac" / "collection.json").is_file()
    assert not (products / "map.html").exists() and 'href="map.html"' not in (products / "index.html").read_text()
    assert any("no space left on device" in r.getMessage() for r in caplog.records)
