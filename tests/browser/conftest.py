"""A real daemon with a token on 127.0.0.1, and Debian's headless chromium driven by Selenium,
with the browser's network log (Chrome's performance log: DevTools Network events) kept so a
test can see every request the page made."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from api.app import openapi_document
from tests.conftest import Daemon, Daemons

TOKEN = "dashboard-t0ken"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
DESKTOP = (1366, 900)
PHONE = (390, 844)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(daemons: Daemons) -> Daemon:
    """The daemon, with a token, listening on TCP too (a browser speaks no unix sockets)."""
    port = free_port()
    daemon = daemons.new("--token", TOKEN, "--listen", f"tcp://127.0.0.1:{port}")
    daemon.client.headers["Authorization"] = f"Bearer {TOKEN}"
    daemon.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return daemon


@pytest.fixture(scope="module")
def base(served: Daemon) -> str:
    return str(served.url)  # type: ignore[attr-defined]


def has_route(method: str, path: str) -> bool:
    """Does this checkout's app serve the operation (is it in its OpenAPI document)?"""
    return method.lower() in openapi_document()["paths"].get(path, {})


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for binary in (CHROMIUM, DRIVER):
        if not shutil.which(binary):
            pytest.fail(f"{binary} is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root, in a VM: Chromium's own sandbox needs a user
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",  # nothing but the page's own requests
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def requests_made(driver: WebDriver) -> list[dict[str, Any]]:
    """The requests the browser sent since the last call (DevTools Network events)."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent.append({"url": request["url"], "headers": request.get("headers", {})})
        elif message["method"] == "Network.webSocketCreated":
            sent.append({"url": message["params"]["url"], "headers": {}})
        elif message["method"] == "Network.webSocketWillSendHandshakeRequest":
            handshake = message["params"]["request"]
            sent.append({"url": "websocket handshake", "headers": handshake.get("headers", {})})
    return sent


def wait(driver: WebDriver, timeout: float = 20) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout, poll_frequency=0.1)


def visible(driver: WebDriver, css: str, timeout: float = 20) -> WebElement:
    def found(d: WebDriver) -> WebElement | bool:
        for element in d.find_elements(By.CSS_SELECTOR, css):
            if element.is_displayed():
                return element
        return False

    return wait(driver, timeout).until(found)  # type: ignore[no-any-return]


def at_size(driver: WebDriver, size: tuple[int, int]) -> None:
    """Lay the page out at `size` CSS pixels: a phone's width too (a desktop window has a
    minimum width, so the phone is emulated through DevTools, as a phone, at 2x)."""
    if size == DESKTOP:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.set_window_size(*size)
        return
    metrics = {"width": size[0], "height": size[1], "deviceScaleFactor": 2, "mobile": True}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def unlock(driver: WebDriver, base: str) -> None:
    """Open the dashboard and give it the token if it asks (once for as long as the tab is open)."""
    driver.get(f"{base}/ui")
    wait(driver).until(
        lambda d: d.execute_script(
            "return document.getElementById('token-dialog').open"
            " || document.getElementById('live').dataset.state !== 'connecting'"
        )
    )
    if driver.execute_script("return document.getElementById('token-dialog').open"):
        driver.find_element(By.ID, "token-input").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait(driver).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, ".sandbox-row, #sandbox-list .empty")
            and "Loading" not in d.find_element(By.ID, "sandbox-list").text
        )
    )
