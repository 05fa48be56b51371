"""The dashboard in a real browser (headless chromium) against a real daemon with a token: it
loads nothing from elsewhere, asks for the token once while the tab is open, follows the
sandboxes live, creates, shows logs, runs a terminal, uploads a file, deletes; and /docs takes
the token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser.conftest import (
    DESKTOP,
    PHONE,
    TOKEN,
    at_size,
    has_route,
    requests_made,
    screenshot,
    unlock,
    visible,
    wait,
)
from tests.conftest import Daemon

pytestmark = pytest.mark.usefixtures("nothing_carries_over")


@pytest.fixture
def daemon(served: Daemon) -> Daemon:
    """nothing_carries_over cleans up the module's daemon: this one."""
    return served


@pytest.fixture
def page(browser: WebDriver, base: str) -> Iterator[WebDriver]:
    """The dashboard, unlocked, at desktop size."""
    at_size(browser, DESKTOP)
    unlock(browser, base)
    yield browser
    browser.get(f"{base}/ui#")  # leave no terminal or stream open into the next test


def open_sandbox(driver: WebDriver, sandbox_id: str, tab: str = "overview") -> None:
    visible(driver, f'.sandbox-row[data-id="{sandbox_id}"]').click()
    wait(driver).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#facts .facts-head[data-id="{sandbox_id}"]')
    )
    visible(driver, f"#tab-{tab}").click()


def terminal_text(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.querySelector('.xterm-rows').innerText"))


def type_in_terminal(driver: WebDriver, text: str) -> None:
    driver.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys(text + Keys.ENTER)


def test_the_page_loads_nothing_but_from_the_daemon(browser: WebDriver, base: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{base}/ui")
    browser.execute_script("sessionStorage.clear()")
    requests_made(browser)  # forget the loads before the storage was cleared
    browser.refresh()
    visible(browser, "#token-dialog")
    assert browser.execute_script(
        "return [typeof Terminal, typeof FitAddon, typeof uPlot, typeof htmx].join()"
    ) == ("function,object,function,object")
    origin = urlsplit(base)
    urls = [r["url"] for r in requests_made(browser) if r["url"].startswith(("http", "ws"))]
    assert any(url.endswith("/static/vendor/xterm/lib/xterm.js") for url in urls), urls
    elsewhere = [url for url in urls if urlsplit(url).netloc != origin.netloc]
    assert not elsewhere, f"requests left the daemon's origin: {elsewhere}"


def test_the_token_is_asked_once_and_sent_as_a_header(browser: WebDriver, base: str) -> None:
    at_size(browser, DESKTOP)
    browser.get(f"{base}/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    visible(browser, "#token-dialog")
    browser.find_element(By.ID, "token-input").send_keys("not-the-token" + Keys.ENTER)
    error = visible(browser, "#token-error")
    assert "refused" in error.text
    screenshot(browser, "token-prompt")
    token_input = browser.find_element(By.ID, "token-input")
    token_input.clear()
    token_input.send_keys(TOKEN + Keys.ENTER)
    wait(browser).until(
        lambda d: not d.execute_script("return document.getElementById('token-dialog').open")
    )
    requests_made(browser)
    browser.refresh()
    wait(browser).until(
        lambda d: (
            d.find_element(By.ID, "live").get_attribute("data-state") != "connecting"
            and "Loading" not in d.find_element(By.ID, "sandbox-list").text
        )
    )
    assert not browser.execute_script("return document.getElementById('token-dialog').open")
    sent = requests_made(browser)
    calls = [r for r in sent if "/ui" not in r["url"] and "/static/" not in r["url"]]
    fragments = [r for r in sent if "/ui/fragments/" in r["url"]]
    assert calls and fragments
    for request in calls + fragments:
        assert request["headers"].get("Authorization") == f"Bearer {TOKEN}", request["url"]
    assert not [r["url"] for r in sent if TOKEN in r["url"]]


def test_a_sandbox_created_over_the_api_appears_without_a_reload(
    page: WebDriver, daemon: Daemon
) -> None:
    page.execute_script("window.notReloaded = true")
    made = daemon.create(name="from-the-api")
    row = visible(page, f'.sandbox-row[data-id="{made["id"]}"]')
    assert "from-the-api" in row.text
    assert page.execute_script("return window.notReloaded") is True


def test_the_form_creates_a_sandbox(page: WebDriver, daemon: Daemon) -> None:
    visible(page, "#create-card summary").click()
    visible(page, "#f-name").send_keys("from-the-form")
    page.find_element(By.ID, "f-cmd").send_keys("sleep 600")
    page.find_element(By.ID, "f-memory").send_keys("64")
    page.find_element(By.ID, "f-ttl").send_keys("3600")
    page.find_element(By.CSS_SELECTOR, "#f-network option[value=none]").click()
    page.find_element(By.ID, "create-submit").click()
    title = visible(page, "#detail-title")
    wait(page).until(lambda d: d.find_element(By.ID, "detail-title").text == "from-the-form")
    made = daemon.client.get("/sandboxes/from-the-form").json()
    daemon.created.add(made["id"])
    assert made["cmd"] == ["sh", "-c", "sleep 600"]
    assert made["limits"]["memory_bytes"] == 64 << 20
    assert made["expires_at"] is not None
    assert title.is_displayed()
    visible(page, f'.sandbox-row[data-id="{made["id"]}"][aria-current="true"]')


def test_the_form_shows_the_daemons_refusal(page: WebDriver, daemon: Daemon) -> None:
    visible(page, "#create-card summary").click()
    visible(page, "#f-name").send_keys("not a name!")
    page.find_element(By.ID, "create-submit").click()
    error = visible(page, "#create-error")
    assert "name" in error.text
    assert daemon.client.get("/sandboxes").json()["items"] == []


def test_the_graph_draws_cpu_and_memory(page: WebDriver, daemon: Daemon) -> None:
    made = daemon.create(name="busy", cmd=["sh", "-c", "while :; do :; done"])
    open_sandbox(page, made["id"])
    visible(page, "#graph canvas")
    wait(page).until(lambda d: "MiB" in d.find_element(By.ID, "usage").text)
    wait(page).until(lambda d: "%" in d.find_element(By.ID, "usage").text)
    screenshot(page, "desktop-usage")


def test_the_terminal_runs_a_command_and_follows_resizes(page: WebDriver, daemon: Daemon) -> None:
    made = daemon.create(name="shell")
    open_sandbox(page, made["id"], tab="terminal")
    visible(page, "#term-start").click()
    wait(page).until(lambda d: d.find_element(By.ID, "term-status").text == "Connected")
    sent = requests_made(page)
    sockets = [r["url"] for r in sent if r["url"].startswith("ws")]
    assert sockets and not [url for url in sockets if TOKEN in url]
    [handshake] = [r["headers"] for r in sent if r["url"] == "websocket handshake"]
    offered = {k.lower(): v for k, v in handshake.items()}["sec-websocket-protocol"]
    assert offered.startswith("sandboxd, bearer.")  # the token, as a subprotocol
    type_in_terminal(page, "echo hi-$((6*7))")
    wait(page).until(lambda d: "hi-42" in terminal_text(d))
    screenshot(page, "desktop-terminal")

    def tty_size() -> tuple[int, int]:
        """What the shell's terminal says its size is, by `stty size` (rows, cols)."""
        marker = f"size-{len(terminal_text(page))}"
        type_in_terminal(page, f"echo {marker}=$(stty size | tr ' ' x)")
        found: list[str] = []

        def printed(d: WebDriver) -> bool:
            for line in terminal_text(d).splitlines():
                if line.startswith(f"{marker}=") and "x" in line:
                    found.append(line.split("=", 1)[1].strip())
                    return True
            return False

        wait(page).until(printed)
        rows, cols = found[0].split("x")
        return int(rows), int(cols)

    wide = tty_size()
    at_size(page, PHONE)
    wait(page).until(lambda d: tty_size()[1] < wide[1])
    narrow = tty_size()
    rows_drawn = page.execute_script("return document.querySelectorAll('.xterm-rows > div').length")
    assert narrow[0] == rows_drawn
    assert narrow[1] < wide[1]
    screenshot(page, "phone-terminal")


@pytest.mark.skipif(
    not has_route("get", "/sandboxes/{ref}/logs"), reason="no GET /sandboxes/{ref}/logs yet"
)
def test_the_logs_show_the_main_commands_output(page: WebDriver, daemon: Daemon) -> None:
    made = daemon.create(
        name="talker", cmd=["sh", "-c", "echo out-$((2+3)); echo err >&2; sleep 600"]
    )
    open_sandbox(page, made["id"], tab="logs")
    wait(page).until(lambda d: "out-5" in d.find_element(By.ID, "logs").text)
    assert "err" in page.find_element(By.CSS_SELECTOR, "#logs .stderr").text
    screenshot(page, "desktop-logs")


@pytest.mark.skipif(
    not (
        has_route("put", "/sandboxes/{ref}/files")
        and has_route("get", "/sandboxes/{ref}/files/list")
    ),
    reason="no files endpoints yet",
)
def test_a_file_uploaded_appears_in_the_browser(
    page: WebDriver, daemon: Daemon, tmp_path: Path
) -> None:
    made = daemon.create(name="files")
    upload = tmp_path / "hello.txt"
    upload.write_text("uploaded from the browser\n")
    open_sandbox(page, made["id"], tab="files")
    wait(page).until(lambda d: "etc/" in d.find_element(By.ID, "files-body").text)
    path = page.find_element(By.ID, "files-path")
    path.clear()
    path.send_keys("/tmp" + Keys.ENTER)
    wait(page).until(lambda d: d.find_element(By.ID, "files-path").get_attribute("value") == "/tmp")
    page.find_element(By.ID, "files-upload").send_keys(str(upload))
    wait(page).until(lambda d: "hello.txt" in d.find_element(By.ID, "files-body").text)
    stored = daemon.client.get(f"/sandboxes/{made['id']}/files", params={"path": "/tmp/hello.txt"})
    assert stored.content == b"uploaded from the browser\n"
    screenshot(page, "desktop-files")


def test_delete_removes_the_sandbox(page: WebDriver, daemon: Daemon) -> None:
    made = daemon.create(name="doomed")
    open_sandbox(page, made["id"])
    delete = visible(page, "#facts [data-action=delete]")
    delete.click()
    assert "for good" in delete.text  # it asks first
    assert daemon.client.get(f"/sandboxes/{made['id']}").status_code == 200
    delete.click()
    wait(page).until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'[data-id="{made["id"]}"]'))
    assert daemon.client.get(f"/sandboxes/{made['id']}").status_code == 404
    visible(page, "#placeholder")


def test_screenshots_at_desktop_and_phone_widths(page: WebDriver, daemon: Daemon) -> None:
    for name, cmd in (("web-1", "sleep 600"), ("build-42", "sleep 600"), ("done", "true")):
        daemon.create(name=name, cmd=["sh", "-c", cmd])
    made = daemon.client.get("/sandboxes/web-1").json()
    open_sandbox(page, made["id"])
    visible(page, "#graph canvas")
    wait(page).until(lambda d: "%" in d.find_element(By.ID, "usage").text)
    screenshot(page, "desktop-overview")
    at_size(page, PHONE)
    page.execute_script("window.scrollTo(0, 0)")
    screenshot(page, "phone-list")
    page.execute_script("document.getElementById('detail').scrollIntoView()")
    screenshot(page, "phone-detail")
    width = page.execute_script("return document.documentElement.scrollWidth")
    assert width <= PHONE[0], "the page scrolls sideways at phone width"
    dark = {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    page.execute_cdp_cmd("Emulation.setEmulatedMedia", dark)
    try:
        at_size(page, DESKTOP)
        page.refresh()  # the graph and terminal take their colours when drawn
        visible(page, "#graph canvas")
        wait(page).until(lambda d: "%" in d.find_element(By.ID, "usage").text)
        screenshot(page, "desktop-overview-dark")
    finally:
        page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_the_page_breaks_no_rule_of_its_own_policy(page: WebDriver, daemon: Daemon) -> None:
    """The Content-Security-Policy holds with everything drawn: no violation, no script error."""
    page.get_log("browser")
    made = daemon.create(name="strict", cmd=["sh", "-c", "sleep 600"])
    open_sandbox(page, made["id"])
    visible(page, "#graph canvas")
    visible(page, "#tab-terminal").click()
    visible(page, "#term-start").click()
    wait(page).until(lambda d: d.find_element(By.ID, "term-status").text == "Connected")
    for tab in ("logs", "files", "overview"):
        visible(page, f"#tab-{tab}").click()
    problems = [
        entry["message"]
        for entry in page.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]
    assert not problems


@pytest.mark.skipif(not has_route("get", "/events"), reason="no GET /events yet")
def test_the_list_follows_the_event_stream(page: WebDriver, daemon: Daemon) -> None:
    wait(page).until(lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live")
    requests_made(page)
    made = daemon.create(name="by-event")
    visible(page, f'.sandbox-row[data-id="{made["id"]}"]')
    streams = [r for r in requests_made(page) if "/events" in r["url"]]
    assert not streams, "the stream was reopened instead of followed"


def test_the_api_docs_take_the_token(browser: WebDriver, base: str) -> None:
    at_size(browser, DESKTOP)
    browser.get(f"{base}/docs")
    visible(browser, "button.btn.authorize").click()
    visible(browser, ".modal-ux input").send_keys(TOKEN)
    visible(browser, ".modal-ux .auth-btn-wrapper button.authorize").click()
    visible(browser, ".modal-ux button.btn-done").click()
    visible(browser, "#operations-system-system_info .opblock-summary").click()
    visible(browser, "#operations-system-system_info .try-out__btn").click()
    visible(browser, "#operations-system-system_info button.execute").click()
    status = visible(
        browser,
        "#operations-system-system_info .live-responses-table tr.response .response-col_status",
    )
    assert status.text.strip() == "200"
    screenshot(browser, "docs-authorized")
