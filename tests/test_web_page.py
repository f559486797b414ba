"""The web page of `swarm api` in headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium through the system chromedriver; never a downloaded browser).

A real 2-server swarm of the default model and a real `swarm api` process in front of it: the page
shows both servers and full coverage, refreshes live, and a chat message typed into it streams an
answer (several chunks) equal to what the API answers the same request without streaming. A
screenshot is saved under the test's tmp dir and its path printed (``pytest -s`` shows it).

Skipped, with the reason, where Chromium, chromedriver or selenium are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm_utils import running_swarm, swarm_cmd, swarm_env

CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
QUESTION = "What is the capital of France?"
MAX_TOKENS = 12


@dataclass
class Target:
    url: str               # the page, ending in /
    peer_ids: set[str]     # the servers it must show
    num_blocks: int


# ---- the browser --------------------------------------------------------------------------------


@pytest.fixture
def browser():
    chromium = shutil.which("chromium")
    if chromium is None or not os.access(CHROMEDRIVER, os.X_OK):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them with apt-get)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


# ---- the subject: `swarm api` in front of a real swarm ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.load(resp)


@contextmanager
def swarm_api(model: Path, initial_peer: str, home: Path, peer_ids: set[str], timeout: float = 60.0):
    """A `swarm api` process on a free port; yields its base URL once ``/v1/swarm`` lists every one
    of ``peer_ids``."""
    port = free_port()
    log_path = home / "api.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            swarm_cmd("api", "--model", str(model), "--initial-peers", initial_peer, "--port", str(port)),
            stdout=log, stderr=subprocess.STDOUT, env=swarm_env(home),
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"swarm api exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if {s["peer_id"] for s in get_json(url + "v1/swarm")["servers"]} >= peer_ids:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"swarm api not ready in {timeout} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def target(tmp_path):
    from swarm.engine.default_model import MARKER, default_model_dir

    model = default_model_dir()
    if not (model / MARKER).is_file():
        pytest.fail(f"the default model is not at {model}: run `make model` first")
    with running_swarm(model, ["0:15", "15:30"], tmp_path) as servers:
        peer_ids = {s.maddr.rsplit("/p2p/", 1)[1] for s in servers}
        with swarm_api(model, servers[0].maddr, tmp_path, peer_ids) as url:
            yield Target(url, peer_ids, 30)


# ---- the test -----------------------------------------------------------------------------------


def test_page_shows_the_swarm_and_streams_a_chat_answer(browser, target, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    js = browser.execute_script
    browser.get(target.url)

    # every server, online, in the table; one green cell per block and no gap
    wait.until(lambda d: {r.get_attribute("data-peer-id") for r in d.find_elements(By.CSS_SELECTOR, "#server-rows tr")}
               == target.peer_ids)
    assert all(r.get_attribute("data-state") == "online" for r in browser.find_elements(By.CSS_SELECTOR, "#server-rows tr"))
    cells = browser.find_elements(By.CSS_SELECTOR, "#coverage .cell")
    assert [c.get_attribute("data-served") for c in cells] == ["true"] * target.num_blocks
    assert browser.find_element(By.ID, "gaps").get_attribute("data-full") == "true"
    assert browser.find_element(By.ID, "gaps").text == f"All {target.num_blocks} blocks served."
    assert browser.find_element(By.ID, "bottleneck").text.startswith("Bottleneck: ")

    # a chat message, sent with Enter, streams an answer in several chunks
    wait.until(lambda d: js("return document.getElementById('model').options.length") > 0)
    model = js("return document.getElementById('model').value")
    browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
    for field, value in (("max-tokens", MAX_TOKENS), ("temperature", 0)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "prompt").send_keys(QUESTION, Keys.ENTER)
    answer = wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, ".msg.assistant:not([data-state='streaming'])"))
    note = answer.find_elements(By.CSS_SELECTOR, ".note")
    assert answer.get_attribute("data-state") == "done", note[0].text if note else answer.text
    assert int(answer.get_attribute("data-chunks")) > 1
    shown = js("return arguments[0].querySelector('.body').textContent", answer)
    assert shown.strip()
    assert [m.get_attribute("data-role") for m in browser.find_elements(By.CSS_SELECTOR, "#messages .msg")] == [
        "user", "assistant"]

    # the page shows exactly the API's answer (greedy: the same without streaming)
    reply = post_json(target.url + "v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
        "temperature": 0, "stream": False,
    })
    assert shown == reply["choices"][0]["message"]["content"]
    assert answer.get_attribute("data-finish") == reply["choices"][0]["finish_reason"]

    # refreshed live, with no script error on the way
    wait.until(lambda d: int(d.find_element(By.ID, "live").get_attribute("data-refreshes")) >= 2)
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    shot = tmp_path / "web-page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot of the page: {shot}")

