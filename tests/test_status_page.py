"""The status page (GET /) and its JSON (GET /v1/status), driven in headless Chromium
against a launched 2-rank ring with an API key: the key prompt, both nodes with their
layer ranges, tokens/s that rises with traffic, a streamed chat reply equal to the API's
greedy answer, a killed rank shown failed while the ring restarts; `mlxring status`."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import httpx
import openai
import pytest

from mlxring import cli
from mlxring.cluster.supervise import RingState
from mlxring.server import schemas
from mlxring.server.status import HISTORY_S, Recent, RingWatch
from tests.ringutil import (
    children,
    cmdline,
    free_port,
    launch_serving,
    stop_launcher,
    two_node_config,
)

KEY = "page-key-5e1f"
AUTH = {"authorization": f"Bearer {KEY}"}
NAMES = ("atlas", "borealis")  # words that appear nowhere in the page's own files
PROMPT = "Describe the ring in one line."
MAX_TOKENS = 40
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
SCREENSHOT_ENV = "MLXRING_STATUS_SCREENSHOT"  # also save the last screenshot here (README)


@pytest.fixture(scope="module")
def ring(tiny_llama, tmp_path_factory):
    """`mlxring launch` of a 2-rank ring with an API key; (launcher, url)."""
    port = free_port()
    header = (
        f"name: page-ring\napi: {{port: {port}, api_keys: [{KEY}]}}\n"
        "batching: {step_timeout: 4}\n"
    )
    config = two_node_config(tmp_path_factory.mktemp("page"), header, NAMES)
    proc = launch_serving(config, tiny_llama)
    try:
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop_launcher(proc)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under selenium, with a fresh profile."""
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
    from selenium.webdriver.chrome.service import Service  # lazy: only with selenium

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="mlxring-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}", "--window-size=1440,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, check, timeout: float = 30, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait  # lazy: only with selenium

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: check(d), message=f"{what} within {timeout} s"
    )


def js(driver, script: str):
    return driver.execute_script(script)


def nodes_on_page(driver) -> list[dict]:
    return js(
        driver,
        "return [...document.querySelectorAll('#ring g.node')].map(g => ({name: g.dataset.node,"
        " state: g.dataset.state, layers: g.querySelector('.badge text').textContent}))",
    )


def text(driver, element_id: str) -> str:
    return js(driver, f"return document.getElementById('{element_id}').textContent")


def screenshot(driver, path: Path) -> None:
    """The whole page, not only the window (Chromium's DevTools protocol)."""
    width, height = js(
        driver,
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]",
    )
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def status(url: str, headers: dict | None = None) -> httpx.Response:
    return httpx.get(f"{url}/v1/status", headers=AUTH if headers is None else headers, timeout=15)


def test_the_static_page_holds_no_node_name_and_no_key(ring):
    _, url = ring
    for path in ("/", "/ui/status.js", "/ui/status.css"):
        r = httpx.get(f"{url}{path}", timeout=10)  # no key: the page asks for it itself
        assert r.status_code == 200, (path, r.text)
        assert not any(name in r.text for name in NAMES) and KEY not in r.text
        assert "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(url, timeout=10).headers["content-type"].startswith("text/html")
    assert status(url, {}).status_code == 401
    body = status(url).json()
    schemas.Status.model_validate(body)
    assert [n["name"] for n in body["nodes"]] == list(NAMES)
    assert body["nodes"][0]["layers"][0] == 0 and body["nodes"][1]["layers"][1] == 5  # inclusive
    assert [n["layers_text"] for n in body["nodes"]] == [
        f"{a}-{b}" for a, b in (n["layers"] for n in body["nodes"])
    ]


def test_the_page_asks_for_the_key_then_draws_the_ring(ring, browser):
    _, url = ring
    browser.get(url)
    wait(browser, lambda d: js(d, "return document.getElementById('key-dialog').open"))
    assert nodes_on_page(browser) == []  # nothing before a key
    browser.find_element("id", "key-input").send_keys("wrong-key")
    browser.find_element("id", "key-submit").click()
    wait(browser, lambda d: "refused" in text(d, "key-error"), what="a refused key")
    browser.find_element("id", "key-input").send_keys(KEY)
    browser.find_element("id", "key-submit").click()
    wait(browser, lambda d: len(nodes_on_page(d)) == 2, what="both nodes")
    want = [f"layers {n['layers_text']}" for n in status(url).json()["nodes"]]
    assert nodes_on_page(browser) == [
        {"name": name, "state": "up", "layers": layers} for name, layers in zip(NAMES, want)
    ]
    assert text(browser, "pill-text") == "serving" and text(browser, "tps") == "0.0"
    browser.refresh()  # the key is kept for the tab: no second prompt
    wait(browser, lambda d: len(nodes_on_page(d)) == 2, what="the ring after a reload")
    assert not js(browser, "return document.getElementById('key-dialog').open")


def test_tokens_per_second_rises_with_traffic(ring, tiny_llama, browser):
    _, url = ring
    assert float(text(browser, "tps")) == 0
    body = {"model": tiny_llama.name, "prompt": "ring", "max_tokens": 24, "temperature": 0}
    for _ in range(3):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
    wait(browser, lambda d: float(text(d, "tps")) > 0, 15, "tokens/s above 0")
    assert text(browser, "itl") != "–" and text(browser, "ttft") != "–"


def test_the_chat_box_streams_the_greedy_answer(ring, tiny_llama, browser, tmp_path):
    _, url = ring
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    want = api.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    want = want.choices[0].message.content
    assert want
    limit = browser.find_element("id", "chat-max")
    limit.clear()
    limit.send_keys(str(MAX_TOKENS))
    browser.find_element("id", "chat-input").send_keys(PROMPT)
    browser.find_element("id", "chat-send").click()
    done = "return document.querySelector('.msg.assistant[data-done=\"true\"]') !== null"
    wait(browser, lambda d: js(d, done), 60, "the streamed reply")
    assert js(browser, "return document.querySelector('.msg.error')") is None
    got = js(browser, "return document.querySelector('.msg.assistant .text').textContent")
    assert got == want
    screenshot(browser, tmp_path / "status-up.png")


def test_mlxring_status_prints_the_table(ring, tiny_llama, capsys, monkeypatch):
    _, url = ring
    monkeypatch.delenv("MLXRING_API_KEY", raising=False)
    monkeypatch.delenv("MLXRING_API_KEYS", raising=False)
    assert cli.main(["status", url, "--api-key", KEY]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{tiny_llama.name}: serving · 2 nodes, 6 layers")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for name, node in zip(NAMES, status(url).json()["nodes"]):
        assert rows[name][:4] == [name, "localhost", "mlx/gpu", node["layers_text"]]
        assert rows[name][-1] == "up"
    monkeypatch.setenv("MLXRING_API_KEY", KEY)
    assert cli.main(["status", f"{url}/v1/"]) == 0 and "serving" in capsys.readouterr().out
    monkeypatch.delenv("MLXRING_API_KEY")
    assert cli.main(["status", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlxring status: error: ") and "needs an API key" in err
    assert len(err.splitlines()) == 1
    assert cli.main(["status", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach" in err and len(err.splitlines()) == 1


def stream(url: str, model: str) -> None:
    body = {"model": model, "prompt": "round and round", "max_tokens": 96, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for _ in r.iter_lines():
            pass


def test_a_killed_rank_is_shown_down_then_back(ring, tiny_llama, browser, tmp_path):
    proc, url = ring
    model = tiny_llama.name
    tail = next(p for p in children(proc.pid) if f"--name {NAMES[1]}" in cmdline(p))
    os.kill(tail, signal.SIGKILL)
    failed = f"return document.querySelector('g.node[data-node=\"{NAMES[1]}\"]').dataset.state"
    wait(browser, lambda d: js(d, failed) == "failed", 30, "the killed node shown failed")
    assert text(browser, "pill-text") == "ring down"
    assert NAMES[1] in text(browser, "banner")
    assert {n["name"]: n["state"] for n in nodes_on_page(browser)}[NAMES[0]] == "down"
    screenshot(browser, tmp_path / "status-down.png")
    down = status(url)  # the launcher's front answers while no head does: keyed too
    if down.json()["status"] == "down":
        schemas.Status.model_validate(down.json())
        assert status(url, {}).status_code == 401
    wait(browser, lambda d: js(d, failed) == "up", 90, "the node back up after the restart")
    wait(browser, lambda d: text(d, "restarts") == "1", 10, "the restart counted")
    events = text(browser, "events")
    assert "failure" in events and NAMES[1] in events and "restart" in events
    # and it serves again: a request, then a few streams at once show in the figures
    body = {"model": model, "prompt": "again", "max_tokens": 16, "temperature": 0}
    assert httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60).is_success
    streams = [threading.Thread(target=stream, args=(url, model)) for _ in range(4)]
    for t in streams:
        t.start()
    wait(browser, lambda d: int(text(d, "running")) > 0 and float(text(d, "tps")) > 0, 30)
    shot = tmp_path / "status-recovered.png"
    screenshot(browser, shot)
    for t in streams:
        t.join(timeout=60)
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(shot, os.environ[SCREENSHOT_ENV])


def test_ring_watch_tells_the_story_and_keeps_the_history():
    """The front's record, without a ring: events, the failed node, history across heads."""
    now = [1_000_000.0]
    state = RingState()
    watch = RingWatch(state, "m", [{"name": "a", "layers": [0, 3]}, {"name": "b"}], lambda: now[0])
    state.up("http://127.0.0.1:1/v1")
    watch.poll()
    state.down("node 'b' (rank 1) was killed by SIGKILL", "b")
    down = watch.down()
    assert down["status"] == "down" and down["error"].startswith("node 'b'")
    assert [n["state"] for n in down["nodes"]] == ["down", "failed"]
    assert down["nodes"][0]["layers"] == [0, 3]
    state.restarting()
    state.up("http://127.0.0.1:2/v1")
    recent = Recent(lambda: now[0])
    for i in range(20):
        recent.token(0.01, first=i == 0)
    recent.spacing(0.01)
    now[0] += 2
    head = {"history": recent.timeline.history()}
    merged = watch.merged(head)
    assert [e["kind"] for e in merged["ring"]["events"]] == ["up", "restart", "failure", "up"]
    assert merged["ring"]["events"][2]["node"] == "b" and merged["ring"]["restarts"] == 1
    assert len(merged["history"]["tokens"]) == HISTORY_S and sum(merged["history"]["tokens"]) == 20
    assert watch.down()["history"]["tokens"][-2] == 20  # kept by the front while down
    t = recent.throughput([3.0, 4.0])
    assert t["tokens_per_second"] == 2.0 and t["ttft_ms"] == 10.0 and t["itl_ms"] == 10.0
    assert t["hop_ms"] == 1.5  # (10 - 3 - 4) / 2 hops
