"""The interactive page: the inpainting handler as a plain function, bad input over HTTP, concurrent requests, and
one end-to-end run in headless Chromium (Debian's chromium and chromium-driver, which .ci/run installs).

All with the shipped models (pretrained/, small) and synthetic faces, so no prepared dataset is needed.
APP_TEST_FACES=cat_face runs the browser test on real val faces, and APP_SCREENSHOT=docs/app_screenshot.png keeps
its screenshot (how the README's was made).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import web.server
from utils.image import save_png
from web.inference import (MAX_UPLOAD_BYTES, DecodeSettings, InputError, inpaint_steps, load_engine, random_hole,
                           read_image)
from web.server import FaceFolders, create_app, hole_string, listen, png_data_url, server

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60  # every wait on the server or the browser is bounded


@pytest.fixture(scope="module")
def engine():
    return load_engine(REPO / "configs" / "MaskGit_demo.yml")


def synthetic_face(seed: int) -> np.ndarray:
    """A smooth colour field with a few blobs: structure for the VQGAN, distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64] / 63
    channels = [np.sin(rng.uniform(1, 4) * x + rng.uniform(1, 4) * y + rng.uniform(0, 6)) for _ in range(3)]
    return np.clip(np.stack(channels, -1) * 90 + 128, 0, 255).astype(np.uint8)


def decode_png(data_url: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB"))


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def tiff_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of gray [H, W] or RGB [H, W, 3] values (PIL writes no 16-bit RGB)."""
    color_type = 2 if values.ndim == 3 else 0
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values.reshape(values.shape[0], -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---- the handler as a plain function ----

def test_handler_keeps_known_pixels_and_runs_T_steps(engine):
    face, hole = synthetic_face(0), random_hole("stroke", np.random.default_rng(0))
    events = list(inpaint_steps(engine, face, hole, engine.defaults.updated({"total_iter": 5})))
    assert [e["type"] for e in events] == ["start"] + ["step"] * 5 + ["result"]
    result = events[-1]["images"]
    assert result.shape == (1, 64, 64, 3)
    assert np.array_equal(result[0][~hole], face[~hole])
    assert np.array_equal(events[-2]["images"], result)  # the last step's image is the result
    assert np.array_equal(events[0]["masked"][hole], np.full((hole.sum(), 3), 128, np.uint8))
    known = [events[0]["mask"]] + [e["mask"] for e in events[1:-1]]  # latent masks, white = known
    assert all((a <= b).all() for a, b in zip(known, known[1:])) and (known[-1] == 255).all()
    assert (known[0] == 0).any()


def test_sampling_gives_several_samples_and_the_sweet_spot_stops_early(engine):
    face, hole = synthetic_face(1), random_hole("box", np.random.default_rng(1))
    settings = engine.defaults.updated({"decoding": "sample", "samples": 3, "total_iter": 6, "sweet_spot": 2,
                                        "seed": 5})
    events = list(inpaint_steps(engine, face, hole, settings))
    assert [e["type"] for e in events].count("step") == 2
    result = events[-1]["images"]
    assert result.shape == (3, 64, 64, 3) and events[1]["mask"].shape == (3, 64, 64)
    assert all(np.array_equal(r[~hole], face[~hole]) for r in result)
    assert not np.array_equal(result[0], result[1])
    again = list(inpaint_steps(engine, face, hole, settings))[-1]["images"]
    assert np.array_equal(again, result)  # the seed fixes the samples


def test_empty_hole_returns_the_input_and_full_hole_makes_a_face(engine):
    face = synthetic_face(2)
    (only,) = inpaint_steps(engine, face, np.zeros((64, 64), bool), engine.defaults)
    assert only["type"] == "result" and np.array_equal(only["images"][0], face) and "no hole" in only["notes"][0]
    events = list(inpaint_steps(engine, face, np.ones((64, 64), bool), engine.defaults.updated({"total_iter": 2})))
    assert "whole image" in events[-1]["notes"][0] and events[-1]["images"].shape == (1, 64, 64, 3)
    assert len(np.unique(events[-1]["images"].reshape(-1, 3), axis=0)) > 10


def test_each_step_is_yielded_as_soon_as_it_is_decoded(engine):
    """Step 1's frame arrives while the last transformer forward is still held back; halton ordering on the way."""
    t, gate_s = 4, 10
    forwards, release = [], threading.Event()

    def gate(module, args):
        if len(forwards) == t - 1:
            release.wait(gate_s)  # a handler that decodes every step before yielding gets here first, and waits
        forwards.append(1)

    handle = engine.model.transformer.register_forward_pre_hook(gate)
    try:
        events = inpaint_steps(engine, synthetic_face(6), random_hole("stroke", np.random.default_rng(6)),
                               engine.defaults.updated({"total_iter": t, "ordering": "halton"}))
        assert next(events)["type"] == "start"
        first = next(events)
        assert first["type"] == "step" and first["step"] == 1 and len(forwards) < t
        release.set()
        rest = list(events)
    finally:
        release.set()
        handle.remove()
    assert [e["type"] for e in rest] == ["step"] * (t - 1) + ["result"] and len(forwards) == t
    assert np.array_equal(rest[-2]["images"], rest[-1]["images"])


def test_random_box_is_one_rectangle_of_16_to_36_pixels_a_side():
    for seed in range(20):
        rows, cols = np.nonzero(random_hole("box", np.random.default_rng(seed)))
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert 16 <= h <= 36 and 16 <= w <= 36 and len(rows) == h * w


@pytest.mark.parametrize("values, message", [
    ({"total_iter": 0}, "T must be"), ({"total_iter": 4, "sweet_spot": 5}, "sweet spot"),
    ({"schedule": "wavy"}, "schedule"), ({"decoding": "beam"}, "decoding"), ({"temperature": 0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"seed": True}, "seed"), ({"samples": 7}, "samples"),
    ({"total_iter": 8.5}, "whole number"), ({"pixel_guidance": "lots"}, "pixel_guidance"), ({"colour": 1}, "colour"),
    ({"seed": -1}, "seed"), ({"seam_blend": 1}, "seam_blend"), ({"ordering": "random"}, "ordering"),
    ({"final_temperature": 0}, "final temperature"), ({"final_temperature": "cold"}, "final_temperature"),
])
def test_bad_settings_are_one_line_messages(values, message):
    with pytest.raises(InputError, match=message):
        DecodeSettings().updated(values)


def test_settings_take_whole_numbers_for_real_ones():
    s = DecodeSettings().updated({"temperature": 2, "pixel_guidance": 0, "sweet_spot": None, "final_temperature": 1})
    assert s.temperature == 2.0 and isinstance(s.pixel_guidance, float) and s.sweet_spot is None
    assert s.final_temperature == 1.0 and s.updated({"final_temperature": None}).final_temperature is None


# ---- uploads ----

def test_upload_is_center_cropped_and_resized():
    wide = np.zeros((120, 200, 3), np.uint8)
    wide[:, 40:160] = 200  # the central 120x120 square is all 200: the crop keeps none of the black sides
    image, notes = read_image(png_bytes(Image.fromarray(wide)))
    assert image.shape == (64, 64, 3) and (image == 200).all() and "center-cropped from 200x120" in notes[0]
    face = synthetic_face(3)
    assert np.array_equal(read_image(png_bytes(Image.fromarray(face)))[0], face)


def test_alpha_and_16_bit_uploads_are_converted_and_said():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[:32, :, 3], rgba[32:, :, 3] = 255, 255, 0
    image, notes = read_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert (image[:32] == (255, 0, 0)).all() and (image[32:] == 255).all() and "alpha" in notes[0]
    image, notes = read_image(png16(np.full((64, 64), 40000)))
    assert (image == 156).all() and "16-bit" in notes[0]
    image, notes = read_image(png16(np.full((64, 64, 3), [65535, 32896, 0])))
    assert (image == (255, 128, 0)).all() and "16-bit" in notes[0]


@pytest.mark.parametrize("data, message", [
    (b"", "empty"), (b"GIF89a not really", "not an image"), (b"x" * (MAX_UPLOAD_BYTES + 1), "limit is 10 MB"),
    (png_bytes(Image.new("RGB", (64, 64)))[:60], "cannot read"),
    (b"%PDF-1.4 document", "not an image"), (tiff_bytes(Image.new("F", (64, 64))), "float"),
])
def test_bad_uploads_are_one_line_messages(data, message):
    with pytest.raises(InputError, match=message) as e:
        read_image(data)
    assert "\n" not in str(e.value)


# ---- over HTTP ----

@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    """The app on a free loopback port, in a thread, with two synthetic val faces (or APP_TEST_FACES)."""
    data = Path(os.environ.get("APP_TEST_FACES") or tmp_path_factory.mktemp("faces"))
    if "APP_TEST_FACES" not in os.environ:
        for i in range(2):
            save_png(synthetic_face(10 + i), data / "val" / f"image_{i:05d}.png")
    sock = listen(0)
    srv = server(create_app(engine, FaceFolders(data), "MaskGit_demo.yml"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", data
    srv.should_exit = True
    thread.join(WAIT_S)


def request(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_request(face: np.ndarray, hole: np.ndarray, settings: dict) -> bytes:
    return json.dumps({"face": png_data_url(face), "hole": hole_string(hole), "settings": settings}).encode()


def test_bad_requests_get_one_line_400s_and_the_server_lives_on(live):
    url, _ = live
    face, hole = synthetic_face(4), random_hole("box", np.random.default_rng(4))
    cases = [
        ("/api/upload", b"not an image at all", "not an image"),
        ("/api/upload", png_bytes(Image.new("RGB", (64, 64)))[:70], "cannot read"),
        ("/api/upload", b"\0" * (MAX_UPLOAD_BYTES + 10), "10 MB"),
        ("/api/inpaint", b"{not json", "not JSON"),
        ("/api/inpaint", b"[1, 2]", "JSON object"),
        ("/api/inpaint", run_request(face, hole, {"total_iter": 99}), "T must be"),
        ("/api/inpaint", json.dumps({"face": "AAAA", "hole": hole_string(hole)}).encode(), "data URL"),
        ("/api/inpaint", json.dumps({"face": png_data_url(face), "hole": "01"}).encode(), "4096"),
        ("/api/inpaint", json.dumps({"face": "data:image/png;base64,@@", "hole": hole_string(hole)}).encode(),
         "base64"),
        ("/api/face?split=val&index=7", None, "not in 0..1"),
        ("/api/face?split=test&index=0", None, "no test faces"),
        ("/api/face?split=train&index=0", None, "val or test"),
        ("/api/face?split=val&index=one", None, "index"),
        ("/api/random-hole?kind=circle", None, "stroke or box"),
    ]
    for path, body, message in cases:
        status, answer = request(url + path, body, "application/octet-stream")
        error = json.loads(answer)["error"]
        assert status == 400 and message in error and "\n" not in error and "Traceback" not in error, (path, error)
    status, answer = request(url + "/api/info")
    assert status == 200 and json.loads(answer)["faces"] == {"val": 2}


def test_internal_errors_are_one_line_messages_too(live, monkeypatch):

    url, _ = live
    body = run_request(synthetic_face(5), random_hole("box", np.random.default_rng(5)), {})

    def fails_at_once(*args):
        raise RuntimeError("boom")

    def fails_midway(*args):
        yield {"type": "start", "notes": []}
        raise RuntimeError("boom")

    monkeypatch.setattr(web.server, "inpaint_steps", fails_at_once)
    status, answer = request(url + "/api/inpaint", body)
    assert status == 500 and json.loads(answer)["error"] == "internal error (RuntimeError); see the server's console"
    monkeypatch.setattr(web.server, "inpaint_steps", fails_midway)
    status, answer = request(url + "/api/inpaint", body)
    events = [json.loads(line) for line in answer.splitlines()]
    assert status == 200 and events[-1] == {"type": "error",
                                            "message": "internal error (RuntimeError); see the server's console"}


def test_upload_over_http_answers_a_64x64_face_and_notes(live):
    url, _ = live
    status, answer = request(url + "/api/upload", png_bytes(Image.new("RGBA", (90, 70), (10, 20, 30, 128))),
                             "application/octet-stream")
    body = json.loads(answer)
    assert status == 200 and decode_png(body["image"]).shape == (64, 64, 3)
    assert any("alpha" in n for n in body["notes"]) and any("center-cropped" in n for n in body["notes"])


def test_four_concurrent_requests_each_get_their_own_result(live, engine):
    url, _ = live
    jobs = [(synthetic_face(20 + i), random_hole("stroke", np.random.default_rng(i)), {"total_iter": 4, "seed": i})
            for i in range(4)]
    expected = [list(inpaint_steps(engine, f, h, engine.defaults.updated(s)))[-1]["images"][0] for f, h, s in jobs]
    start = threading.Barrier(len(jobs))

    def post(job: tuple) -> list[dict]:
        start.wait(WAIT_S)
        status, answer = request(url + "/api/inpaint", run_request(*job))
        assert status == 200
        return [json.loads(line) for line in answer.splitlines()]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(post, jobs))
    for (face, hole, _), events, want in zip(jobs, answers, expected):
        assert [e["type"] for e in events] == ["start"] + ["step"] * 4 + ["result"]
        got = decode_png(events[-1]["images"][0])
        assert np.array_equal(got, want) and np.array_equal(got[~hole], face[~hole])


def test_page_is_self_contained(live):
    url, _ = live
    with urllib.request.urlopen(url + "/", timeout=WAIT_S) as r:
        page, csp = r.read().decode(), r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http://" not in page and "https://" not in page and "<link rel=\"stylesheet\"" not in page


# ---- in a real browser ----

def test_browser_draw_run_and_known_pixels_are_the_input(live, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing; .ci/run installs Debian's chromium chromium-driver")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, data = live
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1330", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        wait = WebDriverWait(driver, WAIT_S)
        page_state = "return document.body.dataset.state"
        driver.get(url)
        wait.until(lambda d: d.execute_script(page_state) == "ready")

        upload = tmp_path / "wide_photo.png"  # an upload is center-cropped to the face the page then uses
        Image.fromarray(np.concatenate([synthetic_face(30), synthetic_face(31)[:, :32]], axis=1)).save(upload)
        driver.find_element(By.ID, "upload").send_keys(str(upload))
        wait.until(lambda d: "center-cropped" in d.find_element(By.ID, "status").text)
        assert np.array_equal(decode_png(driver.execute_script("return app.faceURL")),
                              read_image(upload.read_bytes())[0])

        index = driver.find_element(By.ID, "index")  # then back to a prepared face
        index.clear()
        index.send_keys("1")
        driver.find_element(By.ID, "load").click()
        face_file = sorted((data / "val").glob("*.png"))[1]
        wait.until(lambda d: face_file.name in d.find_element(By.ID, "status").text)

        driver.execute_script("const b = document.getElementById('brush'); b.value = 6;"
                              "b.dispatchEvent(new Event('input'));")
        canvas = driver.find_element(By.ID, "canvas")
        stroke = ActionChains(driver).move_to_element_with_offset(canvas, -120, -70).click_and_hold()
        for dx, dy in [(40, 28)] * 3 + [(40, -25)] * 3:  # a V across the face
            stroke.move_by_offset(dx, dy)
        stroke.release().perform()
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.execute_script(page_state) in ("done", "error"))
        status = driver.find_element(By.ID, "status").text
        assert driver.execute_script(page_state) == "done", status

        face, hole, results = driver.execute_script("return [app.faceURL, app.holeString(), app.results]")
        hole = np.frombuffer(hole.encode(), np.uint8).reshape(64, 64) == ord("1")
        face = decode_png(face)
        assert np.array_equal(face, np.asarray(Image.open(face_file).convert("RGB")))
        assert 100 < hole.sum() < 64 * 64 / 2  # the drawn stroke
        result = decode_png(results[0])
        assert np.array_equal(result[~hole], face[~hole]) and not np.array_equal(result[hole], face[hole])
        t = int(driver.find_element(By.ID, "total_iter").get_attribute("value"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#steps .steprow .tiles")
        assert len(rows) == 2 and all(len(r.find_elements(By.TAG_NAME, "figure")) == t + 1 for r in rows)
        assert driver.find_element(By.CSS_SELECTOR, "a.download").get_attribute("href") == results[0]
        height = driver.execute_script("return document.getElementById('out').getBoundingClientRect().bottom"
                                       " + window.scrollY + window.outerHeight - window.innerHeight")
        driver.set_window_size(1280, int(height) + 8)  # the whole page in the screenshot
        driver.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("APP_SCREENSHOT"):
            shutil.copyfile(tmp_path / "page.png", os.environ["APP_SCREENSHOT"])
    finally:
        driver.quit()
