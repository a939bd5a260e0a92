"""The Streamlit app in a real browser: a real server, headless Chromium, real uploads.

Needs Chromium at /usr/bin/chromium (Debian package ``chromium``) and the ``playwright`` pip package; the
test fails with a clear message when either is missing. Screenshots go to ``test-artifacts/``. The
upload → overlays time is printed (run with ``-s`` to see it), never asserted.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mcloss
from mcloss.core.files import file_sha256

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "default.safetensors"
DEFAULT_SAMPLES = REPO / "checkpoints" / "samples"
TIMEOUT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bird(seed: int, size: int = 160) -> tuple[np.ndarray, list[list[float]]]:
    """A simple synthetic picture with three 'parts' at known places."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 235, np.uint8)
    img += rng.integers(0, 20, img.shape, dtype=np.uint8)
    parts = []
    for k, colour in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200)]):
        x, y = int(rng.integers(20, size - 20)), int(rng.integers(20, size - 20))
        img[y - 10 : y + 10, x - 10 : x + 10] = colour
        parts.append([x + 0.5, y + 0.5, 1.0 if k < 2 else 0.0])
    return img, parts


@pytest.fixture(scope="module")
def app_env(tmp_path_factory) -> dict[str, str]:
    """Environment for the server: MCLOSS_CHECKPOINT / MCLOSS_SAMPLES if set, else the shipped default
    checkpoint and gallery when present, else tiny ones built here."""
    env = dict(os.environ)
    tmp = tmp_path_factory.mktemp("browser")
    if env.get("MCLOSS_CHECKPOINT"):
        pass
    elif DEFAULT_CHECKPOINT.is_file():
        env["MCLOSS_CHECKPOINT"] = str(DEFAULT_CHECKPOINT)
    else:
        model = mcloss.build_model(
            "resnet18", 4, xi=3, img_size=64, class_names=["Red_Crown", "Green_Wing", "Blue_Tail", "Plain"]
        )
        path = tmp / "tiny.safetensors"
        mcloss.save_checkpoint(model, path)
        env["MCLOSS_CHECKPOINT"] = str(path)
    if env.get("MCLOSS_SAMPLES"):
        pass
    elif (DEFAULT_SAMPLES / "index.json").is_file():
        env["MCLOSS_SAMPLES"] = str(DEFAULT_SAMPLES)
    else:
        folder = tmp / "samples"
        folder.mkdir()
        samples = []
        for i in range(2):
            img, parts = _bird(i)
            Image.fromarray(img).save(folder / f"bird_{i}.png")
            samples.append({"file": f"bird_{i}.png", "label": i, "class_name": f"class {i}", "parts": parts})
        (folder / "index.json").write_text(json.dumps({"part_names": ["crown", "wing", "tail"], "samples": samples}))
        env["MCLOSS_SAMPLES"] = str(folder)
    return env


@pytest.fixture(scope="module")
def server(app_env):
    """``streamlit run`` on a free local port; always terminated."""
    port = _free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "streamlit_server.log"
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "streamlit_app.py"),
        "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=app_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"streamlit exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"streamlit not healthy after 90 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


@pytest.fixture(scope="module")
def page(server):
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it (Debian: apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright pip package is not installed (pip install playwright)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1600, "height": 1100}, accept_downloads=True)
            pg.set_default_timeout(TIMEOUT_MS)
            pg.goto(server)
            yield pg
        finally:
            browser.close()


def _png(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _no_traceback(pg) -> None:
    text = pg.inner_text("body")
    assert "Traceback" not in text, text[:2000]
    assert pg.locator('[data-testid="stException"]').count() == 0


def _wait_rerun_done(pg) -> None:
    """Stale elements of the previous run stay in the DOM until the rerun finishes: wait for it.

    The app's own run state, not only the status widget, which a short run may not show: a download button
    clicked while the run that replaces it is still going asks for a file id the server has dropped
    ("Deferred file … not found" in the server log), and no download comes."""
    pg.wait_for_function(
        "() => document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState === 'notRunning'"
        " && !document.querySelector('[data-testid=\"stStatusWidget\"]')"
    )


def _only_button(pg, name: str):
    """The one button named ``name``, once a changed layout's stale copy of it has left the DOM (it can stay a
    moment after the status widget has gone)."""
    from playwright.sync_api import expect

    button = pg.get_by_role("button", name=name)  # visible ones only, as the click's own lookup
    expect(button).to_have_count(1, timeout=30_000)
    return button


def _wait_overlays(pg) -> None:
    pg.locator('img[alt^="Grad-CAM of"]').first.wait_for(state="visible")
    pg.locator('img[alt^="channel 1 of"]').first.wait_for(state="visible")
    _wait_rerun_done(pg)


def _checkpoint_uploader(pg):
    """Choose "Upload a checkpoint…" in the sidebar: the sidebar and the checkpoint file input."""
    sidebar = pg.locator('[data-testid="stSidebar"]')
    sidebar.locator('[data-testid="stSelectbox"]').first.click()
    pg.get_by_role("option", name="Upload a checkpoint…").click()
    return sidebar, sidebar.locator('[data-testid="stFileUploader"]').filter(has_text="Checkpoint file").locator(
        "input[type=file]"
    )


def test_browser_gallery_upload_error_and_recovery(page, app_env, tmp_path):
    pg = page
    # 1. the gallery sample renders first, with its ground-truth parts
    _wait_overlays(pg)
    _no_traceback(pg)
    pg.screenshot(path=str(ARTIFACTS / "app_gallery.png"), full_page=True)
    assert pg.get_by_text("channel peaks on a ground-truth part").count() >= 1

    # 2. switch to upload and upload an image; time until the overlays show
    pg.locator('[data-testid="stSidebar"]').get_by_role("radio", name="Upload", exact=True).click()
    pg.get_by_text("Upload an image or pick a gallery sample").wait_for()
    _wait_rerun_done(pg)
    pg.locator('img[alt^="Grad-CAM of"]').first.wait_for(state="detached")
    assert pg.locator('img[alt^="Grad-CAM of"]').count() == 0
    img, _ = _bird(7, size=240)
    good = tmp_path / "upload_bird.jpg"
    good.write_bytes(_png(img, "JPEG"))
    file_input = pg.locator('[data-testid="stSidebar"] input[type=file]')
    t0 = time.perf_counter()
    file_input.set_input_files(str(good))
    pg.locator('img[alt^="Grad-CAM of"]').first.wait_for(state="visible")
    pg.locator('img[alt^="channel 1 of"]').first.wait_for(state="visible")
    elapsed = time.perf_counter() - t0
    page_line = pg.get_by_text("page ").last.inner_text()
    print(f"\nupload -> overlays visible: {elapsed:.2f} s in the browser; app says: {page_line}")
    _wait_overlays(pg)
    _no_traceback(pg)
    channels = pg.locator('img[alt^="channel "]').count()
    assert channels >= 3
    # original + ξ channels + CCMP + parts + Grad-CAM, all as st.image elements
    assert pg.locator('[data-testid="stImage"]').count() >= channels + 4
    assert pg.locator('img[alt^="CCMP of"]').count() == 1
    assert pg.locator('img[alt^="part composite of"]').count() == 1
    assert pg.get_by_text("upload_bird.jpg").count() >= 1
    pg.screenshot(path=str(ARTIFACTS / "app_upload.png"), full_page=True)

    # 3. a broken file: one clean error sentence, no traceback
    broken = tmp_path / "broken.png"
    broken.write_bytes(_png(img)[:200])
    file_input.set_input_files(str(broken))
    alert = pg.locator('[data-testid="stAlert"]').filter(has_text="Cannot read the image")
    alert.wait_for(state="visible")
    assert "broken.png" in alert.inner_text()
    assert "corrupt or truncated" in alert.inner_text()
    _no_traceback(pg)
    _wait_rerun_done(pg)
    pg.locator('img[alt^="Grad-CAM of"]').first.wait_for(state="detached")
    assert pg.locator('img[alt^="Grad-CAM of"]').count() == 0
    pg.screenshot(path=str(ARTIFACTS / "app_error.png"), full_page=True)

    # 4. a good file again: the overlays come back
    good2 = tmp_path / "second_bird.png"
    good2.write_bytes(_png(_bird(8, size=200)[0]))
    t0 = time.perf_counter()
    file_input.set_input_files(str(good2))
    pg.get_by_text("second_bird.png").first.wait_for()
    pg.locator('img[alt^="Grad-CAM of"]').first.wait_for(state="visible")
    print(f"replacing the file -> overlays visible: {time.perf_counter() - t0:.2f} s in the browser")
    _wait_overlays(pg)
    assert pg.locator('[data-testid="stAlert"]').filter(has_text="Cannot read the image").count() == 0
    assert pg.get_by_text("second_bird.png").count() >= 1
    _no_traceback(pg)
    pg.screenshot(path=str(ARTIFACTS / "app_recovered.png"), full_page=True)

    # downloads: the montage PNG and the ZIP (built on click)
    with pg.expect_download() as dl:
        pg.get_by_role("button", name="Montage (PNG)").click()
    montage = Path(dl.value.path()).read_bytes()
    assert dl.value.suggested_filename == "second_bird_montage.png"
    assert montage.startswith(b"\x89PNG") and Image.open(io.BytesIO(montage)).size[0] > 1000
    pg.get_by_text("JPG", exact=True).click()  # the montage format, then the same montage as a JPEG
    _wait_rerun_done(pg)
    with pg.expect_download() as dl:
        pg.get_by_role("button", name="Montage (JPG)").click()
    jpeg = Path(dl.value.path()).read_bytes()
    assert dl.value.suggested_filename == "second_bird_montage.jpg" and jpeg.startswith(b"\xff\xd8")
    assert Image.open(io.BytesIO(jpeg)).size == Image.open(io.BytesIO(montage)).size and len(jpeg) < len(montage)
    pg.get_by_text("Compare the top-2 classes").click()  # the montage holds what the page shows: both classes
    pg.wait_for_function("() => document.querySelectorAll('img[alt^=\"channel 1 of\"]').length === 2")
    _wait_rerun_done(pg)
    with pg.expect_download() as dl:
        _only_button(pg, "Montage (JPG)").click()
    width, height = Image.open(io.BytesIO(montage)).size
    assert Image.open(dl.value.path()).size == (width, 2 * height + 6)
    pg.get_by_text("Compare the top-2 classes").click()
    pg.wait_for_function("() => document.querySelectorAll('img[alt^=\"channel 1 of\"]').length === 1")
    _wait_rerun_done(pg)
    with pg.expect_download() as dl:
        _only_button(pg, "Everything (ZIP)").click()
    with zipfile.ZipFile(Path(dl.value.path())) as zf:
        names = set(zf.namelist())
        record = json.loads(zf.read("export/second_bird.png.json"))
    assert {"export/second_bird.png.png", "export/second_bird.png.npz"} <= names
    assert any(n.startswith("overlays/") and n.endswith("_gradcam.png") for n in names)
    assert record["file"] == "second_bird.png" and record["image_size"] == [200, 200]
    # what made the files: the checkpoint's sha256 under export's key, the image's bytes, the drawing settings
    options = record["options"]
    assert options["made_by"] == "mcloss app" and options["checkpoint_sha256"] == file_sha256(Path(app_env["MCLOSS_CHECKPOINT"]))
    assert {"maps", "colormap", "alpha", "shared_scale", "tile_height", "topk", "method"} <= set(options)
    assert record["input"]["name"] == "second_bird.png" and len(record["input"]["sha256"]) == 64
    _no_traceback(pg)

    # 5. an uploaded checkpoint: a broken one gets a sidebar error, a good one works
    sidebar, ckpt_input = _checkpoint_uploader(pg)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a checkpoint at all")
    ckpt_input.set_input_files(str(fake))
    ck_alert = sidebar.locator('[data-testid="stAlert"]').filter(has_text="Checkpoint not usable")
    ck_alert.wait_for(state="visible")
    assert "fake.safetensors" in ck_alert.inner_text()
    _no_traceback(pg)
    ckpt_input.set_input_files(app_env["MCLOSS_CHECKPOINT"])
    ck_alert.wait_for(state="detached")
    _wait_overlays(pg)
    _no_traceback(pg)
    assert pg.get_by_text("second_bird.png").count() >= 1


def test_browser_compare_view_and_atlas(page, server):
    pg = page
    pg.goto(server)  # a new session: the gallery sample, no compare
    _wait_overlays(pg)
    assert pg.get_by_text("the same class").count() == 0
    pg.locator('[data-testid="stSidebar"]').get_by_text("Compare with a second model").click()
    pg.get_by_text("the same class").first.wait_for(state="visible")
    _wait_rerun_done(pg)
    _no_traceback(pg)
    # both models' group of the class (the second row may still be arriving when the heading shows)
    pg.wait_for_function("() => document.querySelectorAll('img[alt^=\"channel 1 of\"]').length === 2")
    assert pg.get_by_text("its top-3:").count() >= 1
    pg.screenshot(path=str(ARTIFACTS / "app_compare.png"), full_page=True)
    # the downloads hold what the page shows: both models, as mcloss export --compare writes them
    with pg.expect_download() as dl:
        _only_button(pg, "Montage (PNG)").click()
    montage = Image.open(dl.value.path())
    with pg.expect_download() as dl:
        _only_button(pg, "Everything (ZIP)").click()
    with zipfile.ZipFile(Path(dl.value.path())) as zf:
        names = set(zf.namelist())
        (json_name,) = [n for n in names if n.startswith("export/") and n.endswith(".json")]
        record = json.loads(zf.read(json_name))
        one = Image.open(io.BytesIO(zf.read(json_name.removesuffix(".json") + ".png")))
        arrays = np.load(io.BytesIO(zf.read(json_name.removesuffix(".json") + ".npz")))
    assert montage.size == one.size  # the same two-model montage as the export's
    assert record["compare"]["checkpoint"] and record["options"]["compare_sha256"] == record["compare"]["sha256"]
    assert "compare_channels" in arrays.files
    assert sum(n.startswith("overlays/") and n.endswith("_ch1.png") for n in names) == 2  # both models' channel 1
    pg.get_by_text("Atlas: where").first.click()
    pg.locator('img[alt^="atlas of"]').first.wait_for(state="visible")
    _wait_rerun_done(pg)
    _no_traceback(pg)
    pg.get_by_text("gallery images: ch 1:").first.wait_for(state="visible")
    pg.screenshot(path=str(ARTIFACTS / "app_atlas.png"), full_page=True)


def test_browser_imports_a_state_dict_with_its_class_names(page, server, tmp_path):
    """A .pth state dict of the official ResNet-18 script, uploaded with a names file, is imported on the fly;
    a whole pickled model is refused in one line and runs nothing."""
    import transcribed as T

    pg = page
    pg.goto(server)
    _wait_overlays(pg)
    sidebar, ckpt_input = _checkpoint_uploader(pg)
    whole = tmp_path / "whole.pth"
    subprocess.run(
        [sys.executable, "-c", "import torch, sys\nclass model_bn(torch.nn.Linear): pass\n"
         "torch.save(model_bn(2, 2), sys.argv[1])", str(whole)],
        check=True,
    )  # fmt: skip
    ckpt_input.set_input_files(str(whole))
    alert = sidebar.locator('[data-testid="stAlert"]').filter(has_text="Checkpoint not usable")
    alert.wait_for(state="visible")
    said = alert.inner_text().replace("\u2060", "")  # the word joiners that keep names and URLs text
    assert "whole.pth: holds pickled Python objects (__main__.model_bn)" in said and "state_dict()" in said
    _no_traceback(pg)

    state = tmp_path / "official_resnet18.pth"
    T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=9).save(state)
    ckpt_input.set_input_files(str(state))
    alert.wait_for(state="detached")
    _wait_overlays(pg)
    sidebar.get_by_text("imported from official-resnet (official_resnet18.pth)").wait_for(state="visible")
    assert pg.get_by_text("class_000").count() + pg.get_by_text("class_001").count() >= 1
    names = tmp_path / "names.txt"
    names.write_text("Ivory_Gull\nJet_Crow\nKhaki_Finch\nLilac_Wren\n")
    sidebar.locator('[data-testid="stFileUploader"]').filter(has_text="Class names").locator(
        "input[type=file]"
    ).set_input_files(str(names))
    pg.get_by_text(re.compile(r"(Ivory_Gull|Jet_Crow|Khaki_Finch|Lilac_Wren) — prediction")).first.wait_for()
    _wait_overlays(pg)
    # every element of the page is redrawn with the names (on a loaded machine the last stale ones can lag)
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stMain\"]').innerText.includes('class_00')", timeout=90_000
    )
    pg.screenshot(path=str(ARTIFACTS / "app_imported.png"), full_page=True)
    _no_traceback(pg)

    # a Lightning .ckpt with an EMA copy beside the model: the message names both, the key prefix chooses
    live, averaged = (T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=s).state_dict() for s in (10, 11))
    run = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in live.items()} | {f"ema.{k}": v for k, v in averaged.items()}}, run)
    ckpt_input.set_input_files(str(run))
    alert.wait_for(state="visible")
    assert "run.ckpt: the keys as saved fit no layout, but those under 'model.' and 'ema.' each fit one" in alert.inner_text().replace(
        "\u2060", ""
    )
    prefix = sidebar.get_by_role("textbox", name="Key prefix (optional)")
    prefix.fill("ema.")
    prefix.press("Enter")
    alert.wait_for(state="detached")
    sidebar.get_by_text("imported from official-resnet (run.ckpt)").wait_for(state="visible")
    _wait_overlays(pg)
    _no_traceback(pg)


HOSTILE_NAMES = [
    "<iframe src='http://127.0.0.1:9/iframe'></iframe>",
    "<img src='http://127.0.0.1:9/img.png'>",
    "[click](http://127.0.0.1:9/link) **bold** $x$",
    "<style>body{display:none}</style>",
]


def test_browser_class_names_are_text_and_request_nothing(page, server, tmp_path):
    """A checkpoint whose class names hold HTML, Markdown links and styles: every name shows as the text it is,
    and the page fetches nothing from anywhere but the app."""
    torch.manual_seed(0)
    model = mcloss.build_model("resnet18", 4, xi=3, img_size=64, class_names=HOSTILE_NAMES)
    path = tmp_path / "hostile.safetensors"
    mcloss.save_checkpoint(model, path)
    pg = page
    foreign: list[str] = []
    pg.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else foreign.append(r.url))
    pg.goto(server)
    _wait_overlays(pg)
    sidebar, ckpt_input = _checkpoint_uploader(pg)
    ckpt_input.set_input_files(str(path))
    sidebar.get_by_text("resnet18 · 4 classes").wait_for()  # the hostile checkpoint, not the default, is loaded
    pg.get_by_text("— prediction").first.wait_for()
    _wait_overlays(pg)
    main = pg.locator('[data-testid="stMain"]')
    body = main.inner_text().replace("\u2060", "")  # the word joiners that keep URLs text
    shown = [name for name in HOSTILE_NAMES if name in body]
    assert shown, body[:1500]  # the predicted class's heading and the heads' sentence show the name verbatim
    assert main.locator("iframe").count() == 0 and main.locator("img[src*='127.0.0.1:9']").count() == 0
    links = main.locator("a[href*='127.0.0.1:9']")
    assert links.count() == 0, links.first.evaluate("a => a.parentElement.parentElement.outerHTML")
    assert pg.locator("style", has_text="display:none").count() == 0
    assert pg.evaluate("getComputedStyle(document.body).display") != "none"
    pg.screenshot(path=str(ARTIFACTS / "app_hostile_names.png"), full_page=True)
    assert foreign == []
    _no_traceback(pg)


def _loaded_images(pg, selector: str) -> int:
    """How many images matching ``selector`` have finished loading with real pixels."""
    return pg.eval_on_selector_all(selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length")


def test_browser_why_a_not_b_view(page, server, app_env, tmp_path):
    """An uploaded sample image, the "Why A, not B?" view, another class B: Finer-CAM and the group contrast
    against that B are drawn, their images load, and the page shows no error."""
    pg = page
    pg.goto(server)
    _wait_overlays(pg)
    samples = Path(app_env["MCLOSS_SAMPLES"])
    entries = json.loads((samples / "index.json").read_text())["samples"]
    entry = entries[1 if len(entries) > 1 else 0]
    picture = tmp_path / f"why_{Path(entry['file']).name}"
    picture.write_bytes((samples / entry["file"]).read_bytes())
    pg.locator('[data-testid="stSidebar"]').get_by_role("radio", name="Upload", exact=True).click()
    pg.get_by_text("Upload an image or pick a gallery sample").wait_for()
    _wait_rerun_done(pg)
    pg.locator('[data-testid="stSidebar"] input[type=file]').set_input_files(str(picture))
    pg.get_by_text(picture.name).first.wait_for()
    _wait_overlays(pg)

    t0 = time.perf_counter()
    pg.get_by_text("Why A, not B?", exact=True).click()
    finer, contrast = 'img[alt^="Finer-CAM of"]', 'img[alt^="group contrast of"]'
    pg.locator(finer).first.wait_for(state="visible")
    pg.locator(contrast).first.wait_for(state="visible")
    _wait_rerun_done(pg)
    print(f"\nwhy view -> maps visible: {time.perf_counter() - t0:.2f} s in the browser")
    _no_traceback(pg)
    heading = pg.get_by_text(re.compile(r"^Why .+, not .+\?$")).first.inner_text()
    default_b = heading.rsplit(", not ", 1)[1].rstrip("?")

    # pick another B: the second class in B's list (nearest logit first)
    pg.locator('[data-testid="stSelectbox"]').filter(has_text="B: the class to tell it from").click()
    option = pg.get_by_role("option").nth(1)
    b = re.split(r"\s+·\s+|\s+\(= A\)", option.inner_text())[0].strip()  # "name · FC p", the label of the option
    assert b and b != default_b
    option.click()
    for selector in (f'img[alt$=" against {b}"][alt^="Finer-CAM of"]', f'img[alt$=" against {b}"][alt^="group contrast of"]'):
        pg.locator(selector).first.wait_for(state="visible")
    _wait_rerun_done(pg)
    pg.get_by_text(f", not {b}?").first.wait_for()
    for selector in (finer, contrast):
        pg.wait_for_function(
            "s => { const e = [...document.querySelectorAll(s)]; return e.length > 0 && e.every(i => i.complete && i.naturalWidth > 0); }",
            arg=selector,
        )
        assert _loaded_images(pg, selector) == pg.locator(selector).count() == 1
    assert pg.get_by_text("Finer-CAM · ").count() >= 1 and pg.get_by_text("group contrast · ").count() >= 1
    # an upload has no part annotations: the parts are named (when the card knows them), not marked
    main = pg.locator('[data-testid="stMain"]')
    said = main.inner_text().replace("\u2060", "")
    assert "Tell apart:" in said or "does not record its classes' defining parts" in said
    errors = main.locator('[data-testid="stAlert"]').filter(has_text=re.compile("Something went wrong|Could not explain"))
    assert errors.count() == 0
    _no_traceback(pg)
    pg.screenshot(path=str(ARTIFACTS / "app_why_a_not_b.png"), full_page=True)
