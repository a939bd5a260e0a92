"""The app's memory over many uploads of distinct images (issue 26): the process RSS after each upload, as a user
hits it, and what the app's caches hold.

    python scripts/app_memory.py                          # 200 uploads, Streamlit's AppTest in this process
    python scripts/app_memory.py --driver browser         # a real server driven by headless Chromium
    python scripts/app_memory.py --tracemalloc            # + the allocations that grew from upload 20 to the end
    python scripts/app_memory.py --view both              # apptest: alternate the groups and "Why A, not B?" views
    python scripts/app_memory.py --app /tmp/old/app/streamlit_app.py   # another version of the app (before/after)

Every upload is a different synthetic bird (:func:`mcloss.data.synth.render_bird`, 224–600 px, JPEG), uploaded
into one session on the shipped default checkpoint (``MCLOSS_CHECKPOINT`` overrides it). ``apptest`` runs the app
script in this process (its ``st.cache_data`` / ``st.cache_resource`` are process-global, as a server's are) and
reads this process's RSS; ``browser`` starts ``streamlit run`` and uploads through Chromium's file input, reading
the server's RSS. Growth is measured from upload ``--from`` (20) to the last.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app" / "streamlit_app.py"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "default.safetensors"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def bird_images(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` distinct JPEG images of synthetic birds of every class, 224–600 px on a side."""
    from mcloss.data.synth import instance_rng, render_bird
    from mcloss.data.synth.design import class_definitions

    birds = class_definitions(12)
    out = []
    for i in range(n):
        rng = instance_rng(seed, i)
        size = int(rng.integers(224, 601))
        img = render_bird(birds[i % len(birds)], size, rng).image
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append((f"bird_{i:03d}.jpg", buf.getvalue()))
    return out


# ---------------------------------------------------------------------------------------- cache contents


def _nbytes(obj, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the arrays, images and byte strings reachable from ``obj`` (an estimate of a cache entry's payload)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 12:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes if obj.base is None or id(obj.base) not in seen else 0
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, Image.Image):
        return obj.width * obj.height * len(obj.getbands())
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_nbytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith(("mcloss", "view")):
        return sum(_nbytes(v, seen, depth + 1) for v in vars(obj).values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_nbytes(getattr(obj, f), seen, depth + 1) for f in obj.__dataclass_fields__)
    return 0


def cache_contents() -> list[tuple[str, str, int, int]]:
    """(kind, function, entries, bytes) of every ``st.cache_data`` / ``st.cache_resource`` of this process; a
    data cache's bytes are its pickled entries, a resource cache's the arrays and images its values hold (the
    loaded models' weights are not counted)."""
    from streamlit.runtime.caching.cache_data_api import _data_caches
    from streamlit.runtime.caching.cache_resource_api import _resource_caches

    rows = []
    for caches in list(_data_caches._function_caches.values()):
        for cache in list(caches.values()):
            mem = getattr(cache.storage, "_mem_cache", {})
            rows.append(("data", cache.display_name.rsplit(".", 1)[-1], len(mem), sum(len(v) for v in mem.values())))
    for caches in list(_resource_caches._function_caches.values()):
        for cache in list(caches.values()):
            entries = list(cache._mem_cache.values())
            name = cache.display_name.rsplit(".", 1)[-1]
            size = 0 if "load" in name else sum(_nbytes(e.value) for e in entries)
            rows.append(("resource", name, len(entries), size))
    return sorted(rows)


# ----------------------------------------------------------------------------------------------- drivers


#: The app's two views (``--view both`` alternates them, one per upload).
VIEWS = {"groups": ("Channel groups",), "why": ("Why A, not B?",), "both": ("Channel groups", "Why A, not B?")}


def drive_apptest(images: Sequence[tuple[str, bytes]], measure: Callable[[int], None], view: str = "groups",
                  app: Path = APP) -> None:  # fmt: skip
    """Upload every image into one AppTest session (as the file uploader's callback stores it), in this process."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(app), default_timeout=300)
    at.run()
    measure(0)
    views = VIEWS[view]
    for i, (name, data) in enumerate(images, 1):
        at.session_state["view_mode"] = views[i % len(views)]
        at.session_state["source"] = "Upload"
        at.session_state["upload"] = {"name": name, "data": data}
        at.run()
        if at.exception or at.error:
            raise RuntimeError(f"upload {i} ({name}): {[e.value for e in (*at.exception, *at.error)]}")
        measure(i)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive_browser(images: Sequence[tuple[str, bytes]], measure: Callable[[int], None], server: subprocess.Popen,
                  url: str) -> None:  # fmt: skip
    """Upload every image through Chromium's file input into one page of the server at ``url``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(180_000)
            pg.goto(url)
            pg.get_by_role("radio", name="Upload").or_(pg.get_by_text("Upload", exact=True)).first.click()
            pg.get_by_text("Upload an image or pick a gallery sample").wait_for()
            measure(0)
            for i, (name, data) in enumerate(images, 1):
                pg.locator('[data-testid="stFileUploaderDropzone"] input[type="file"]').first.set_input_files(
                    {"name": name, "mimeType": "image/jpeg", "buffer": data}
                )
                pg.locator(f'[data-testid="stImageCaption"]:has-text("{name}")').first.wait_for()
                pg.locator('img[alt^="Grad-CAM of"]').first.wait_for(state="visible")
                pg.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with {server.returncode}")
                measure(i)
        finally:
            browser.close()


def start_server(env: dict[str, str], log: Path, app: Path = APP) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "127.0.0.1", "--server.port",
           str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError("streamlit not healthy after 120 s")
        time.sleep(0.3)


# ------------------------------------------------------------------------------------------------- main


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", choices=("apptest", "browser"), default="apptest")
    ap.add_argument("--uploads", type=int, default=200)
    ap.add_argument("--from", dest="start", type=int, default=20, help="growth is measured from this upload")
    ap.add_argument("--every", type=int, default=20, help="print a row every this many uploads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--view", choices=tuple(VIEWS), default="groups", help="apptest: the view each upload is shown in")
    ap.add_argument("--app", type=Path, default=APP, help="the app script (e.g. an earlier version's, to compare)")
    ap.add_argument("--tracemalloc", action="store_true", help="apptest: the top allocations that grew (slower)")
    args = ap.parse_args(argv)
    args.app = args.app.resolve()
    os.environ.setdefault("MCLOSS_CHECKPOINT", str(DEFAULT_CHECKPOINT))
    images = bird_images(args.uploads, args.seed)
    assert len({d for _, d in images}) == len(images)
    sizes = [Image.open(io.BytesIO(d)).size[0] for _, d in images]
    print(f"driver {args.driver} · view {args.view if args.driver == 'apptest' else 'groups'} · checkpoint {Path(os.environ['MCLOSS_CHECKPOINT']).name} · {len(images)} distinct "
          f"birds, {min(sizes)}–{max(sizes)} px · {os.cpu_count()} CPUs")  # fmt: skip

    rows: dict[int, float] = {}
    snapshots = {}
    server = None

    def measure(i: int) -> None:
        if i in (args.start, args.uploads) or i % args.every == 0 or i == 1:
            if server is None:
                gc.collect()
            rows[i] = rss_mb("self" if server is None else server.pid)
            extra = ""
            if server is None:
                caches = ", ".join(f"{n} {k} {b / 2**20:.1f} MB" for _, n, k, b in cache_contents())
                extra = f"   caches: {caches}"
            print(f"{i:>8} {rows[i]:>9.1f}{extra}", flush=True)
            if args.tracemalloc and i in (args.start, args.uploads):
                import tracemalloc

                snapshots[i] = tracemalloc.take_snapshot()

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(8)
    print(f"{'upload #':>8} {'RSS MB':>9}")
    if args.driver == "apptest":
        drive_apptest(images, measure, args.view, args.app)
    else:
        log = REPO / "test-artifacts" / "app_memory_server.log"
        log.parent.mkdir(exist_ok=True)
        server, url = start_server(dict(os.environ), log, args.app)
        try:
            drive_browser(images, measure, server, url)
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    a, b = rows[args.start], rows[args.uploads]
    print(f"growth from upload {args.start} to {args.uploads}: {b - a:+.1f} MB = {100 * (b - a) / a:+.1f} %")
    if server is None:
        _malloc_trim()
        print(f"after malloc_trim(0): {rss_mb():.1f} MB")
        for kind, name, n, size in cache_contents():
            print(f"  {kind:<8} {name:<16} {n:>4} entries  {size / 2**20:7.2f} MB  ({size / max(n, 1) / 1024:.0f} KB each)")
    if len(snapshots) == 2:
        stats = snapshots[args.uploads].compare_to(snapshots[args.start], "lineno")
        print(f"top allocations that grew from upload {args.start} to {args.uploads}:")
        for s in stats[:15]:
            print(f"  {s.size_diff / 2**20:+7.2f} MB  {s.count_diff:+7d}  {s.traceback[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
