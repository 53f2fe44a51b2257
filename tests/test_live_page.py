"""The live page in a real headless Chromium, against the three programs under supervisord."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.support import (
    REPO,
    Spawner,
    free_port,
    program_log,
    supervised,
    supervisorctl,
    wait_until,
)

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")
"""Debian's binary first: /usr/bin/chromium is a shell wrapper around it."""
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", REPO / "build" / "test-artifacts"))
BROWSER_NETWORK_ERROR = re.compile(r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/mqtt' failed")
"""What Chromium itself logs, as a console error, for each reconnect attempt while the broker is
down: the browser's network log, not the page's script, and the outage the test causes."""


def chromium() -> str:
    """The Chromium executable to drive, or fail with how to get it."""
    for candidate in (os.environ.get("CHROMIUM", ""), *CHROMIUM_PATHS):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    pytest.fail("Chromium is not installed: apt-get install chromium (.ci/run does)")


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A headless Chromium (Debian's), driven by Playwright."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium(), args=["--headless=new", "--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()


def figure(page: Page, element: str) -> int:
    """An integer the page shows in ``#element``."""
    return int(page.inner_text(f"#{element}"))


def test_the_live_page_pings_shows_traffic_and_survives_a_broker_kill(
    tmp_path: Path, port: int, browser: Browser
) -> None:
    ws_port = free_port()
    with supervised(tmp_path, port, ws_port=ws_port) as conf:
        wait_until(lambda: "Subscribed to /ping" in program_log(tmp_path, "echo_client"), 20,
                   "the echo_client's SUBACK")  # fmt: skip
        page = browser.new_page(viewport={"width": 1000, "height": 980})
        problems: list[str] = []

        def console(message: ConsoleMessage) -> None:
            if message.type == "error" and not BROWSER_NETWORK_ERROR.match(message.text):
                problems.append(f"console error: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.goto(f"http://127.0.0.1:{ws_port}/")
        page.wait_for_function("Number(document.getElementById('answered').textContent) >= 3",
                               timeout=20_000)  # fmt: skip
        status = page.locator("#status")
        assert status.get_attribute("data-state") == "up"
        assert f"Connected to ws://127.0.0.1:{ws_port}/mqtt (MQTT 5)" in status.inner_text()
        assert page.inner_text("#rtt-p50").endswith(" ms")
        # The ping_client's own traffic, as it flows; the broker's $SYS figures.
        page.wait_for_function("document.querySelectorAll('#traffic li.pong').length >= 2",
                               timeout=10_000)  # fmt: skip
        assert re.search(r"/ping\s+b'\d{10}'", page.inner_text("#traffic"))
        # ping_client, echo_client and the page, once $SYS has counted them (every 2 s).
        page.wait_for_function("Number(document.getElementById('sys-clients').textContent) >= 3",
                               timeout=10_000)  # fmt: skip
        assert page.inner_text("#sys-memory").endswith(" MiB")

        # The broker dies; supervisord starts it again; the page says so, and goes on.
        broker = re.search(r"pid (\d+)", supervisorctl(conf, "status", "broker"))
        assert broker is not None
        os.kill(int(broker.group(1)), signal.SIGKILL)
        page.wait_for_function("document.getElementById('status').dataset.state === 'down'",
                               timeout=10_000)  # fmt: skip
        assert "No connection to the broker since" in status.inner_text()
        assert figure(page, "outages") == 1
        page.wait_for_function("document.getElementById('status').dataset.state === 'up'",
                               timeout=20_000)  # fmt: skip
        assert re.search(r"Back after \d+\.\d s without the broker", status.inner_text())
        answered = figure(page, "answered")
        page.wait_for_function(
            f"Number(document.getElementById('answered').textContent) >= {answered + 2}",
            timeout=15_000,
        )
        shaded = page.evaluate("window.pingpong.outages.filter(o => o.end !== null).length")
        assert shaded == 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(tmp_path / "live-page.png"), full_page=True)
        shutil.copy(tmp_path / "live-page.png", ARTIFACTS / "live-page.png")
        assert problems == []


def test_without_mqttjs_the_page_says_in_one_line_what_to_run(
    spawn: Spawner, port: int, tmp_path: Path, browser: Browser
) -> None:
    page_dir = tmp_path / "web"
    shutil.copytree(REPO / "web", page_dir, ignore=shutil.ignore_patterns("node_modules"))
    ws_port = free_port()
    broker = spawn.broker(port, "--ws-port", str(ws_port), "--http-dir", str(page_dir))
    broker.wait_for(rf"Listening on 127\.0\.0\.1:{ws_port} for MQTT over WebSockets")
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{ws_port}/")
    status = page.locator("#status")
    page.wait_for_function("document.getElementById('status').dataset.state === 'missing'",
                           timeout=10_000)  # fmt: skip
    assert status.inner_text() == (
        "MQTT.js is not installed next to the page: run `make web` (it needs npm), then reload."
    )
