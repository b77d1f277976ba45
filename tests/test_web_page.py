"""The web page of `leansam serve`, end to end in headless Chromium (Debian's package, driven by
Playwright; no browser download): open a coco-mini image, click an object, see the mask overlay,
undo it, download the COCO JSON. A screenshot is kept in out/test-artifacts/web_page.png."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import COCO_MINI, REPO, require_extra
from service_process import ServerProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network and a root user (see the project's machine notes).
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "out" / "test-artifacts"


@pytest.fixture(scope="module")
def playwright_api():
    if not os.path.exists(CHROMIUM):
        message = "Debian's chromium is not installed (make test installs it with apt-get)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return require_extra("playwright.sync_api")


def test_click_shows_mask_overlay(playwright_api, coco_val):
    images, anns = coco_val
    info = next(im for im in images if len(anns[im["id"]]) >= 1)
    ann = max(anns[info["id"]], key=lambda a: a["area"])
    x, y, w, h = ann["bbox"]
    path = COCO_MINI / "val2017" / info["file_name"]
    args = ["--model", "leansam-efficientvit-s", "--log-level", "warning"]
    with ServerProcess(args) as server, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900}, accept_downloads=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.set_input_files("#file", str(path))
            page.wait_for_function("window.leansam.imageId !== null", timeout=120_000)
            assert page.evaluate("[window.leansam.width, window.leansam.height]") == [
                info["width"],
                info["height"],
            ]
            # click the centre of the largest object's box, in the canvas's on-screen box
            box = page.locator("#canvas").bounding_box()
            sx, sy = box["width"] / info["width"], box["height"] / info["height"]
            page.mouse.click(box["x"] + (x + w / 2) * sx, box["y"] + (y + h / 2) * sy)
            page.wait_for_function("window.leansam.maskArea > 0", timeout=120_000)
            state = page.evaluate(
                "({n: window.leansam.prompts.length, area: window.leansam.mask.area,"
                " status: document.getElementById('status').textContent})"
            )
            assert state["n"] == 1 and state["area"] > 0 and state["status"].startswith("Mask:")
            # the overlay was drawn: some canvas pixels are tinted towards the overlay's blue
            tinted = page.evaluate(
                """() => { const c = document.getElementById('canvas');
                  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i + 2] > d[i] + 60;
                  return n; }"""
            )
            assert tinted > 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_page.png"))
            with page.expect_download() as dl:
                page.click("#coco")
            coco = json.loads(dl.value.path().read_text())
            assert coco["images"][0]["width"] == info["width"]
            assert coco["annotations"][0]["segmentation"]["size"] == [info["height"], info["width"]]
            page.click("#undo")
            page.wait_for_function("window.leansam.maskArea === 0 && !window.leansam.mask")
            assert errors == []
        finally:
            browser.close()
    assert (ARTIFACTS / "web_page.png").stat().st_size > 10_000
