"""Headless Chromium for the browser tests (Debian's ``chromium`` + ``chromium-driver`` through Selenium).

Nothing is downloaded at run time: the driver and the browser are the system's (``tools/ensure-browser`` installs
them where they are missing; the README's test command runs it). When they are missing anyway, the tests fail with
that one line rather than being skipped: a browser test that silently does not run would be a test that cannot fail.

Every request the page makes is read back from Chromium's performance log (``network_requests``), so a test can
check that nothing left localhost. Screenshots go to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "chromium-driver")


def _which(names: tuple[str, ...], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        found = shutil.which(name) or (f"/usr/lib/chromium/{name}" if Path(f"/usr/lib/chromium/{name}").is_file() else None)
        if found:
            return found
    return None


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator[object]:
    """A headless Chromium WebDriver with the performance log on; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _which(BROWSERS, "GEOLINK_CHROMIUM"), _which(DRIVERS, "GEOLINK_CHROMEDRIVER")
    if browser is None or driver_path is None:
        raise RuntimeError("headless browser tests need Debian's chromium and chromium-driver: run tools/ensure-browser "
                           "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-default-apps", "--disable-sync", "--metrics-recording-only"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def network_requests(driver) -> list[str]:
    """URLs of every request the page made since the last call (Chromium's performance log, drained)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def outside_localhost(urls: list[str]) -> list[str]:
    """The URLs that are neither this machine's HTTP server nor in-page (``data:``, ``blob:``)."""
    from urllib.parse import urlsplit

    bad = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about"):
            continue
        if parts.scheme not in ("http", "https") or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            bad.append(url)
    return bad


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition", every: float = 0.2):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value {last!r})")


def screenshot(driver, name: str) -> Path:
    """Save a PNG of the page under ``tests/artifacts/`` (kept after the run for a person to look at)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def press(driver, key: str) -> None:
    """Type ``key`` into the page (whatever holds the focus), as a person at the keyboard would."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def label_state(driver, expr: str):
    """``window.labelState.<expr>`` of the labelling page (engine/web/static/label.js exposes it for tests)."""
    return driver.execute_script(f"return window.labelState && window.labelState.{expr}")


def label_settled(driver) -> bool:
    """The labelling page has loaded and no answer is still on its way to the server."""
    return bool(label_state(driver, "ready")) and label_state(driver, "pending") == 0


@contextlib.contextmanager
def serving(server) -> Iterator[str]:
    """Run an ``http.server`` server in a thread; yield its base URL; shut it down on exit."""
    from engine.web.server import server_url

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_url(server, "").rstrip("/")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
