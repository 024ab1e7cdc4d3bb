"""The playground page in a real browser: Debian's headless chromium driven over the Chrome
DevTools Protocol on its ``--remote-debugging-pipe`` (file descriptors 3 and 4, NUL-separated
JSON), so no Python package beyond the standard library is needed.

A real uvicorn server with tiny models runs on 127.0.0.1; the test types a post into the page,
clicks submit, reads the ranked candidates back, checks them against the server's own answer for
the same seeded request, and saves a screenshot. The page talks to ``POST /v1/chat/completions``
with ``stream: true`` and reads the server-sent events itself.

Needs ``apt-get install chromium``; skipped otherwise. Run: ``pytest -m browser tests/test_serve_browser.py``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from rlhflab.data.tldr import format_query
from rlhflab.serve.app import BackgroundServer, create_app, demo_models

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000", "--remote-debugging-pipe"]
POST = "My cat sleeps on my keyboard every morning.\nShould I buy her a bed or a second keyboard?"


class Browser:
    """A headless chromium and one page, spoken to over the DevTools pipe."""

    def __init__(self, user_data_dir: Path, log_path: Path):
        to_chrome_r, self._to_chrome_w = os.pipe()  # chromium reads commands on fd 3
        self._from_chrome_r, from_chrome_w = os.pipe()  # and writes replies/events on fd 4
        script = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(["/bin/bash", "-c", script, CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}"],
                                     pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._next_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _next_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"no reply from chromium (exit code {self.proc.poll()}; see {self.log.name})")
            ready, _, _ = select.select([self._from_chrome_r], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe; see {self.log.name}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def js(self, expression: str):
        """Value of a JS expression in the page (promises awaited)."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {expression}")

    def type_into(self, element_id: str, text: str) -> None:
        """Focus an input, clear it, and type ``text`` as keyboard input (fires input events)."""
        self.js(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); e.value = ''; e.focus(); }})()")
        self.call("Input.insertText", {"text": text}, session=True)

    def click(self, element_id: str) -> None:
        """A real mouse click at the centre of the element."""
        x, y = self.js(f"(() => {{ const r = document.getElementById({json.dumps(element_id)}).getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                      session=True)

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome_w)
        os.close(self._from_chrome_r)
        self.log.close()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile", tmp_path / "chromium.log")
    yield b
    b.close()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    policy, tok, reward = demo_models(seed=0)
    app = create_app(policy, reward, tokenizer=tok, max_best_of=8, max_tokens=32, max_prompt_tokens=200)
    with BackgroundServer(app) as srv:
        yield srv


def test_playground_ranks_candidates(server, browser, tmp_path):
    browser.call("Page.navigate", {"url": server.url + "/"}, session=True)
    browser.wait_for("document.readyState === 'complete' && document.getElementById('health').textContent.startsWith('policy')")
    assert browser.js("document.getElementById('best-of').max") == "8"  # limits read from /health

    browser.type_into("title", "my cat and my keyboard")
    browser.type_into("post", POST)
    browser.type_into("best-of", "5")
    browser.type_into("temperature", "0.9")
    browser.type_into("max-tokens", "12")
    browser.type_into("seed", "7")
    query = format_query("relationships", "my cat and my keyboard", POST)
    assert browser.js("document.getElementById('query-preview').textContent") == query  # JS == Python format
    browser.click("submit")
    browser.wait_for("document.querySelectorAll('#results li.candidate').length === 5")
    shown = browser.js("""Array.from(document.querySelectorAll('#results li.candidate')).map(li => ({
        index: Number(li.dataset.index), reward: Number(li.dataset.reward), picked: li.classList.contains('picked'),
        badge: getComputedStyle(li.querySelector('.badge')).display, text: li.querySelector('pre').textContent}))""")
    assert "Done in" in browser.js("document.getElementById('status').textContent")
    # It came over the chat endpoint as a stream: role chunk, the winner, its finish, usage, [DONE].
    assert browser.js("document.getElementById('results').dataset.transport") == "chat-stream"
    assert int(browser.js("document.getElementById('results').dataset.events")) >= 5

    rewards = [c["reward"] for c in shown]
    assert rewards == sorted(rewards, reverse=True)
    assert [c["picked"] for c in shown] == [True, False, False, False, False]  # the top score is highlighted
    assert [c["badge"] != "none" for c in shown] == [True, False, False, False, False]  # "best-of-N pick" badge

    # The same seeded request straight to the server: the page shows exactly its candidates and pick.
    same = httpx.post(server.url + "/v1/completions", json={"prompt": query, "n": 1, "best_of": 5, "temperature": 0.9,
                                                           "max_tokens": 12, "seed": 7}, timeout=60).json()
    expected = sorted(same["best_of"]["candidates"], key=lambda c: -c["reward"])
    assert [c["index"] for c in shown] == [c["index"] for c in expected]
    assert rewards == pytest.approx([c["reward"] for c in expected], abs=1e-9)
    assert shown[0]["index"] == same["best_of"]["picked_index"]
    assert [c["text"] for c in shown] == [c["text"] for c in expected]

    png = browser.screenshot(tmp_path / "playground.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert width > 0 and height > 0


def test_playground_raw_prompt_and_server_error(server, browser):
    browser.call("Page.navigate", {"url": server.url + "/"}, session=True)
    browser.wait_for("document.readyState === 'complete' && document.getElementById('health').textContent.startsWith('policy')")
    browser.click("mode-raw")
    assert browser.js("document.getElementById('raw-fields').hidden") is False
    assert browser.js("document.getElementById('post-fields').hidden") is True
    browser.type_into("prompt", "x" * 201)  # max_prompt_tokens=200; byte tokenizer: 201 tokens
    browser.click("submit")
    status = browser.wait_for("document.getElementById('status').className === 'error' && "
                              "document.getElementById('status').textContent")
    assert status == "Error 400: prompt is 201 tokens; the limit is 200"
    assert browser.js("document.querySelectorAll('#results li').length") == 0

    browser.type_into("prompt", "Once upon a time")
    browser.type_into("best-of", "3")
    browser.click("submit")
    browser.wait_for("document.querySelectorAll('#results li.candidate').length === 3")
    assert browser.js("document.querySelectorAll('#results li.picked').length") == 1

    # N = 1: the tokens stream live (one event per token at least), then the ranked single candidate.
    browser.type_into("best-of", "1")
    browser.type_into("max-tokens", "10")
    browser.click("submit")
    browser.wait_for("document.querySelectorAll('#results li.candidate').length === 1")
    assert int(browser.js("document.getElementById('results').dataset.events")) >= 4  # role, finish, usage, [DONE]
