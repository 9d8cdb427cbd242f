"""Open a local HTML file in headless Chromium, offline, and report what a reader's browser would
show: console errors, uncaught exceptions, images that do not decode, requests that left the
machine, and a full-page screenshot. ``tests/explain/test_reports_in_browser.py`` uses it.

No Python dependency: Chromium is driven through the DevTools protocol over a pipe
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes, commands read on its file
descriptor 3, replies and events written on its descriptor 4), so there is no port and no
websocket client. The network is cut three ways: every host name resolves to nothing
(``--host-resolver-rules``), every request goes to a proxy that does not exist, and any request
that is not ``file:``, ``data:`` or ``about:`` is recorded and fails the page.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")
TRAMPOLINE = ("import os, sys\n"
              "for fd, to in zip(map(int, sys.argv[1:3]), (3, 4)):\n"
              "    os.dup2(fd, to)\n"
              "    os.close(fd)\n"
              "os.execv(sys.argv[3], sys.argv[3:])\n")

# After the load event: every <img> is complete with a natural width, and decodes.
IMAGES_JS = """
(async () => {
  const images = Array.from(document.images);
  const decoded = await Promise.all(images.map(i => i.decode().then(() => true, e => String(e))));
  return JSON.stringify(images.map((img, k) => ({
    src: img.currentSrc.slice(0, 40), complete: img.complete, naturalWidth: img.naturalWidth,
    naturalHeight: img.naturalHeight, decoded: decoded[k]})));
})()
"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) to use: ``$LUNG_EFFNET_CHROMIUM``, else the first on ``PATH``."""
    explicit = os.environ.get("LUNG_EFFNET_CHROMIUM")
    if explicit:
        return explicit
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


@dataclass
class PageReport:
    """What opening one page showed."""

    url: str
    loaded: bool = False
    title: str = ""
    images: list[dict] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    remote_requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    navigation_error: str = ""

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not (i["complete"] and i["naturalWidth"] > 0 and i["decoded"] is True)]

    def problems(self) -> list[str]:
        """Everything wrong with the page, one line each; empty when it rendered cleanly."""
        found = [f"navigation failed: {self.navigation_error}"] if self.navigation_error else []
        found += [] if self.loaded else ["the load event never fired"]
        found += [f"image does not decode: {i}" for i in self.broken_images]
        found += [f"console error: {m}" for m in self.console_errors]
        found += [f"uncaught exception: {m}" for m in self.exceptions]
        found += [f"browser log error: {m}" for m in self.log_errors]
        found += [f"request off the machine: {u}" for u in self.remote_requests]
        found += [f"request failed: {u}" for u in self.failed_requests]
        return found


class _Pipe:
    """The DevTools protocol over Chromium's debugging pipe."""

    def __init__(self, to_browser: int, from_browser: int, deadline: float):
        self.to_browser, self.from_browser, self.deadline = to_browser, from_browser, deadline
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.from_browser], [], [], left)
            if ready:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise ConnectionError("Chromium closed the debugging pipe")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result; events read meanwhile are kept in ``events``."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.to_browser, data):]
        while True:
            reply = self._read_message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        """Read until the event ``method`` arrives (or one already did)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message()
            self.events.append(event)
            if event.get("method") == method:
                return event


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _console_text(params: dict) -> str:
    args = params.get("args", [])
    return " ".join(str(a.get("value", a.get("description", a.get("type")))) for a in args)


def open_page(page: str | Path, screenshot: str | Path, chromium: str, profile: str | Path,
              timeout: float = 60.0, width: int = 1280) -> PageReport:
    """Open ``page`` (a local file) in headless ``chromium`` with the network disabled, wait for its
    load event, check its images, collect errors and write a full-page PNG to ``screenshot``.
    ``profile``: an empty folder for the browser profile. Raises ``TimeoutError`` after ``timeout``
    seconds (the browser is killed either way)."""
    url = Path(page).resolve().as_uri()
    report = PageReport(url=url)
    log = open(Path(profile) / "chromium.log", "wb")  # noqa: SIM115 (closed below, the browser writes it)
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    to_r, from_w = _above_9(to_r), _above_9(from_w)  # the browser's ends: they cannot be 3 or 4 already
    args = [chromium, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
            '--host-resolver-rules=MAP * ~NOTFOUND', "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
            f"--window-size={width},900", "about:blank"]
    # The pipe's ends become the browser's descriptors 3 and 4 through a small Python trampoline (no
    # preexec_fn in a process with torch's threads; dash cannot redirect descriptors above 9).
    proc = subprocess.Popen([sys.executable, "-c", TRAMPOLINE, str(to_r), str(from_w), *args], pass_fds=(to_r, from_w),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    os.close(to_r)
    os.close(from_w)
    cdp = _Pipe(to_w, from_r, time.monotonic() + timeout)
    failure: Exception | None = None
    try:
        target = next(t for t in cdp.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.send(f"{domain}.enable", session=session)
        cdp.events.clear()  # about:blank's own
        report.navigation_error = cdp.send("Page.navigate", {"url": url}, session=session).get("errorText", "")
        cdp.wait_for("Page.loadEventFired")
        report.loaded = True
        images = cdp.send("Runtime.evaluate", {"expression": IMAGES_JS, "awaitPromise": True, "returnByValue": True},
                          session=session)
        report.images = json.loads(images["result"]["value"])
        report.title = cdp.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                                session=session)["result"]["value"]
        size = cdp.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = cdp.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=session)
        report.screenshot = Path(screenshot)
        report.screenshot.parent.mkdir(parents=True, exist_ok=True)
        report.screenshot.write_bytes(base64.b64decode(shot["data"]))
        cdp.send("Runtime.evaluate", {"expression": "0"}, session=session)  # flush the events still queued
        try:
            cdp.send("Browser.close")
        except ConnectionError:
            pass
    except (ConnectionError, TimeoutError) as error:
        failure = error
    finally:
        for fd in (to_w, from_r):
            os.close(fd)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:  # the browser and any helper left: the process group this call started
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        log.close()
    if failure is not None:  # what the browser said is the useful part
        said = (Path(profile) / "chromium.log").read_text(errors="replace").strip().splitlines()[-15:]
        raise type(failure)(f"{failure} (exit status {proc.returncode}); its log ends:\n" + "\n".join(said))
    for event in cdp.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.console_errors.append(_console_text(params))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            report.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            report.log_errors.append(f"{entry.get('text')} ({entry.get('url', '')})")
        elif method == "Network.requestWillBeSent":
            request_url = params.get("request", {}).get("url", "")
            if not request_url.startswith(LOCAL_SCHEMES):
                report.remote_requests.append(request_url)
        elif method == "Network.loadingFailed":
            report.failed_requests.append(f"{params.get('errorText')} ({params.get('type')})")
    return report
