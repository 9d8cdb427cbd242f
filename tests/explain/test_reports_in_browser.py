"""The HTML saliency pages in a real browser (headless Chromium, network disabled): the train report
and a ``score --saliency`` page load, every image decodes at its PNG's size, nothing is logged as an
error, nothing is requested off the machine, and a full-page screenshot is kept as a test artifact
(under the test's temp folder, and copied to ``$LUNG_EFFNET_TEST_ARTIFACTS`` when set).

Skipped, with the reason, where no Chromium is installed (``apt-get install chromium``; or point
``$LUNG_EFFNET_CHROMIUM`` at a Chrome). The browser is driven by ``tests/browser.py``, whose
checks are themselves tested on a hand-written broken page and on a corrupted copy of the report.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from tests.browser import CANDIDATES, PageReport, find_chromium, open_page

PNG_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
# An address the page would load from elsewhere: a src/href/... attribute, a CSS url() or @import.
REMOTE_REFERENCE = re.compile(r"""(?:\b(?:src|href|srcset|action|poster|data)\s*=\s*['"]?|url\(\s*['"]?|"""
                              r"""@import\s+['"]?)\s*(?:https?:|//)""", re.IGNORECASE)
# A 2x2 PNG, and bytes that are not one.
GOOD_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="
NOT_A_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n but the rest is not an image at all").decode()


@pytest.fixture(scope="session")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("HTML reports not checked in a browser: no Chromium found (looked for $LUNG_EFFNET_CHROMIUM, "
                    f"{', '.join(CANDIDATES)} on PATH); install it with `apt-get install chromium`")
    return found


@pytest.fixture(scope="module")
def score_page(chromium, tiny_model_dir, tmp_path_factory, read_csv) -> Path:
    """The page ``score --saliency`` writes for one small DICOM series (the untrained tiny ensemble)."""
    import contextlib
    import io

    from lung_effnet.cli import main
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    base = tmp_path_factory.mktemp("browser-score")
    source = write_synthetic_dataset(base / "src", "dicom", n_patients=1, seed=5, size_px=48, n_slices=4, progress=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(["score", "-q", "--model", str(tiny_model_dir), "--input", str(source), "--out", str(base / "out"),
                     "--workers", "0", "--batch-size", "4", "--saliency"])
    assert code == 0, printed.getvalue()
    rows = read_csv(base / "out" / "predictions.csv")
    assert len(rows) == 1 and rows[0]["report"], rows
    return base / "out" / rows[0]["report"]


def _png_size(b64: str) -> tuple[int, int]:
    head = base64.b64decode(b64[:44])  # signature, IHDR length and type, width, height
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _open(page: Path, tmp_path: Path, chromium: str, name: str) -> PageReport:
    """Open ``page``; the screenshot is written under ``tmp_path / "screenshots"`` and copied to
    ``$LUNG_EFFNET_TEST_ARTIFACTS`` when set; its path is printed."""
    profile = tmp_path / f"profile-{name}"
    profile.mkdir()
    report = open_page(page, tmp_path / "screenshots" / f"{name}.png", chromium, profile)
    shot = report.screenshot
    artifacts = os.environ.get("LUNG_EFFNET_TEST_ARTIFACTS")
    if shot is not None and artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, Path(artifacts) / shot.name))
    print(f"screenshot of {page.name} in headless Chromium: {shot}")
    return report


def _assert_renders(page: Path, tmp_path: Path, chromium: str, name: str) -> PageReport:
    source = page.read_text(encoding="utf-8")
    assert not REMOTE_REFERENCE.findall(source), "the page refers to an address off the machine"
    pngs = PNG_URI.findall(source)
    assert pngs, "no embedded image in the page"
    report = _open(page, tmp_path, chromium, name)
    assert report.problems() == []
    title = re.search(r"<title>(.*?)</title>", source)
    assert title and report.title == html.unescape(title.group(1))
    assert [(i["naturalWidth"], i["naturalHeight"]) for i in report.images] == [_png_size(b) for b in pngs]
    from PIL import Image

    assert report.screenshot is not None
    with Image.open(report.screenshot) as shot:
        width, height = shot.size
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert width >= 1000 and height >= 300 * len(pngs) / 2  # the whole page, not the first screen only
    assert colours is None or len(colours) > 200  # drawn: text, and the overlays' colour maps
    return report


def test_train_saliency_report_renders_in_a_browser(chromium, saliency_run, tmp_path):
    page = saliency_run["run"] / "saliency" / "report.html"
    _assert_renders(page, tmp_path, chromium, "train-saliency-report")
    # The same page with one image spoiled is caught: the check can fail on the real page.
    source = page.read_text(encoding="utf-8")
    spoiled = tmp_path / "spoiled.html"
    spoiled.write_text(source.replace(PNG_URI.findall(source)[-1], NOT_A_PNG), encoding="utf-8")
    report = _open(spoiled, tmp_path, chromium, "train-saliency-report-spoiled")
    assert len(report.broken_images) == 1 and report.problems() == [f"image does not decode: {report.broken_images[0]}"]


def test_score_saliency_page_renders_in_a_browser(chromium, score_page, tmp_path):
    _assert_renders(score_page, tmp_path, chromium, "score-saliency-page")


def test_the_browser_check_reports_what_is_wrong(chromium, tmp_path):
    """On hand-written pages: a clean one passes; broken images, console errors, uncaught
    exceptions and requests off the machine are each reported, and the network is really off."""
    head = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title></head><body><h1>page</h1>"
    clean = tmp_path / "clean.html"
    clean.write_text(f"{head}<img src='data:image/png;base64,{GOOD_PNG}'></body></html>")
    report = _open(clean, tmp_path, chromium, "checker-clean")
    assert report.problems() == [] and [(i["naturalWidth"], i["decoded"]) for i in report.images] == [(2, True)]

    broken = tmp_path / "broken.html"
    broken.write_text(f"{head}<img src='data:image/png;base64,{GOOD_PNG}'><img src='data:image/png;base64,{NOT_A_PNG}'>"
                      "<img src='http://example.com/remote.png'><img src='missing.png'>"
                      "<script>console.error('spoiled on purpose'); window.noSuchFunction();</script></body></html>")
    report = _open(broken, tmp_path, chromium, "checker-broken")
    assert [i["naturalWidth"] > 0 for i in report.images] == [True, False, False, False]
    assert len(report.broken_images) == 3
    assert report.console_errors == ["spoiled on purpose"]
    assert len(report.exceptions) == 1 and "noSuchFunction" in report.exceptions[0]
    assert report.remote_requests == ["http://example.com/remote.png"]
    assert any("ERR_PROXY_CONNECTION_FAILED" in m or "ERR_NAME_NOT_RESOLVED" in m for m in report.failed_requests)
    assert any("missing.png" in m for m in report.log_errors)  # failed loads are logged as errors
    assert len(report.problems()) >= 7
