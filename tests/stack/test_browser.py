"""A real browser: headless Chromium on example_app's page, replicas 1 s behind.

The page adds a tracker and lists the trackers with fetch(); nothing but the
browser's own cookie handling carries the read-your-writes token from the
create to the list. Chromium and its WebDriver come from
``scripts/browser.sh install`` (Debian's ``chromium`` and ``chromium-driver``);
the test speaks the W3C WebDriver protocol to chromedriver directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..helpers import replicas_lagging

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with status {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not answer at {url}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def lagging_replicas() -> Iterator[None]:
    with replicas_lagging():
        yield


PAGE_PORT = free_port()  # another origin, serving the same page (the cross-origin case)


@pytest.fixture(scope="module")
def server(lagging_replicas: None) -> Iterator[str]:
    """example_app under uvicorn, as deployed; it lets the page origin call it (CORS)."""
    port = free_port()
    env = {
        **os.environ,
        "RWDB_ROUTING_HEADER": "true",
        "EXAMPLE_CORS_ORIGINS": f"http://127.0.0.1:{PAGE_PORT}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example_app.main:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process, "uvicorn")
        yield url
    finally:
        stop(process)


class Browser:
    """Just enough of the W3C WebDriver protocol."""

    def __init__(self, endpoint: str, session: str) -> None:
        self._session = f"{endpoint}/session/{session}"
        self._http = httpx.Client(base_url=self._session, timeout=60)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        assert response.status_code == 200, response.text
        return response.json()["value"]

    def go(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def type(self, css: str, text: str) -> None:
        element = self._call("POST", "/element", {"using": "css selector", "value": css})
        self._call("POST", f"/element/{element[ELEMENT]}/clear", {})
        self._call("POST", f"/element/{element[ELEMENT]}/value", {"text": text})

    def click(self, css: str) -> None:
        element = self._call("POST", "/element", {"using": "css selector", "value": css})
        self._call("POST", f"/element/{element[ELEMENT]}/click", {})

    def run(self, script: str) -> Any:
        return self._call("POST", "/execute/sync", {"script": script, "args": []})

    def run_async(self, script: str) -> Any:
        return self._call("POST", "/execute/async", {"script": script, "args": []})

    def cookies(self) -> dict[str, str]:
        return {c["name"]: c["value"] for c in self._call("GET", "/cookie")}

    def quit(self) -> None:
        # The session's own URL, not "" joined to it: httpx's base URL ends in "/", and
        # chromedriver answers "unknown command" to ".../session/<id>/", leaving the
        # browser running once chromedriver is stopped.
        response = self._http.delete(self._session)
        self._http.close()
        assert response.status_code == 200, f"the browser did not quit: {response.text[:200]}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        subprocess.run(["bash", str(ROOT / "scripts/browser.sh"), "install"], check=True)
    port = free_port()
    driver = subprocess.Popen(
        ["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    profile = tempfile.mkdtemp(prefix="rwdb-chromium-")
    try:
        wait_for(f"{endpoint}/status", driver, "chromedriver")
        args = [*CHROME_ARGS, f"--user-data-dir={profile}"]
        options = {"binary": shutil.which("chromium"), "args": args}
        created = httpx.post(
            f"{endpoint}/session",
            json={"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}},
            timeout=60,
        )
        assert created.status_code == 200, created.text
        browser = Browser(endpoint, created.json()["value"]["sessionId"])
        try:
            yield browser
        finally:
            browser.quit()
    finally:
        stop(driver)
        left = leftovers(profile)
        shutil.rmtree(profile, ignore_errors=True)
        # Asserted after the clean-up, which never leaves a process behind either way.
        assert left == [], f"browser processes outlived the test (killed now): {left}"


def browser_processes(profile: str) -> list[int]:
    """Live processes of the browser started with this profile (zombies are dead)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile
        if profile.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def leftovers(profile: str, grace: float = 10.0) -> list[int]:
    """The browser's processes still alive ``grace`` seconds after it was told to quit;
    each is killed, so that a failing run does not leave them behind either."""
    deadline = time.monotonic() + grace
    while (alive := browser_processes(profile)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


LIST_WITHOUT_COOKIES = """
const done = arguments[arguments.length - 1];
fetch(API + "trackers?limit=20", {credentials: "omit"})
  .then((r) => r.json()).then((ts) => done(ts.map((t) => t.serial)));
"""


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """The page alone, from an origin of its own (a plain static file server)."""
    static = ROOT / "example_app" / "static"
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(PAGE_PORT), "--bind", "127.0.0.1"],
        cwd=static,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{PAGE_PORT}/index.html"
    try:
        wait_for(url, process, "the page's static server")
        yield url
    finally:
        stop(process)


def test_the_page_lists_the_tracker_it_just_added(server: str, browser: Browser) -> None:
    add_and_list(browser, server)


def test_the_same_from_another_origin_through_cors(
    server: str, page_origin: str, browser: Browser
) -> None:
    """The page on one origin, the API on another: fetch() with credentials, the
    quick start's CORSMiddleware arguments, and the browser's cookie jar do the rest."""
    add_and_list(browser, f"{page_origin}?api={server}")
    origin = browser.run("return location.origin")
    assert origin == page_origin.rsplit("/", 1)[0] and not server.startswith(origin)


def add_and_list(browser: Browser, url: str) -> None:
    browser.go(url)
    missed_without_cookie = 0
    for i in range(5):
        serial = f"WEB-{uuid.uuid4().hex[:10]}"
        browser.type("input[name=name]", f"browser van {i}")
        browser.type("input[name=serial]", serial)
        browser.run("document.getElementById('status').textContent = ''")
        browser.click("button")
        status = ""
        deadline = time.monotonic() + 20
        while not status and time.monotonic() < deadline:
            status = browser.run("return document.getElementById('status').textContent")
            time.sleep(0.05)
        # The list right after the create, through the browser's cookie: it is there.
        assert status == f"added {serial}", status
        assert serial in browser.run("return document.getElementById('list').textContent")
        assert browser.cookies().get("rwdb_pin")
        # The same browser without its cookie, at once: the replicas lag 1 s behind.
        missed_without_cookie += serial not in browser.run_async(LIST_WITHOUT_COOKIES)
    assert missed_without_cookie > 0  # the control: the cookie is what made it work
