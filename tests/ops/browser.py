"""A real headless Chromium driven over the DevTools protocol (no Selenium): open a page
with basic-auth credentials, wait until given texts show, save a screenshot.

Credentials go in an ``Authorization`` header on every request of the page
(``Network.setExtraHTTPHeaders``): credentials inside the URL reach the document but not the
dashboard's own XHR calls, whose URLs Chromium refuses to carry credentials.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tars_tasks import supervisor

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,900",
)


@dataclass
class PageCapture:
    text: str
    screenshot: Path
    seen: dict[str, bool]


class CDP:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._id = 0

    async def call(self, method: str, **params) -> dict:
        self._id += 1
        my_id = self._id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = await self.ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"devtools connection closed: {msg!r}")
            data = json.loads(msg.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout_s: float) -> int:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        if port_file.exists():
            first = port_file.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


async def _drive(port: int, url: str, headers: dict[str, str], wait_for: list[str], screenshot: Path,
                 timeout_s: float) -> PageCapture:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = CDP(ws)
            await cdp.call("Network.enable")
            if headers:
                await cdp.call("Network.setExtraHTTPHeaders", headers=headers)
            await cdp.call("Page.enable")
            await cdp.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout_s
            text = ""
            seen = dict.fromkeys(wait_for, False)
            while time.monotonic() < deadline:
                res = await cdp.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                     returnByValue=True)
                text = res.get("result", {}).get("value") or ""
                seen = {w: w in text for w in wait_for}
                if all(seen.values()):
                    break
                await asyncio.sleep(0.3)
            shot = await cdp.call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return PageCapture(text=text, screenshot=screenshot, seen=seen)


def capture_page(*, url: str, screenshot: Path, profile_dir: Path, wait_for: list[str] = (),
                 basic_auth: tuple[str, str] | None = None, timeout_s: float = 20.0) -> PageCapture:
    """Open ``url`` in headless Chromium, wait for every text in ``wait_for`` (or the timeout)."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    headers = {}
    if basic_auth:
        token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    proc = supervisor.start(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", "about:blank"],
        log_path=profile_dir.parent / "chromium.log",
    )
    try:
        port = _devtools_port(profile_dir, proc, timeout_s=30)
        return asyncio.run(_drive(port, url, headers, list(wait_for), screenshot, timeout_s))
    finally:
        supervisor.stop([proc], grace_s=10, term_group=True)  # Chromium's own processes are in its group
