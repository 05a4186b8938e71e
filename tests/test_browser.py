"""The interactive panels in a real browser: JupyterLab and headless Chromium, driven by playwright.

One test: a tiny pipeline run (00, 02) makes a run folder; papermill writes copies of 03 and 05 with its
parameters (`--prepare-only`); JupyterLab serves the copies on 127.0.0.1 with a token; Chromium runs every
cell of each, checks that no cell errored and that the widgets rendered, clicks through the result browser,
the embedding map and the search panel, checks that the picture changed and prints the click-to-new-picture
latencies. Screenshots go to the test's temporary folder (and to `$LABKIT_BROWSER_ARTIFACTS` when set).
Every process it starts (JupyterLab, its kernels, Chromium) is stopped by the end, by PID.

Skipped, saying what to install, without chromium (`apt-get install chromium`, or `$LABKIT_CHROMIUM`
pointing at a Chromium binary), playwright or jupyterlab (`pip install -e ".[browser]"`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from labkit import pipeline

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# 40 classes x 50 images of 32 px: 1,000 validation items (the size the latency aim is stated for).
PARAMS = {
    "n_classes": 40,
    "images_per_class": 50,
    "figure_size": 32,
    "image_size": 32,
    "batch_size": 64,
    "accelerator": "cpu",
}
NOTEBOOK_EXTRA = {"draw_k": 3, "n_worst": 3, "k": 4}
WIDGET_ERROR = "Error displaying widget"


def chromium_path() -> str | None:
    given = os.environ.get("LABKIT_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)


def _missing() -> str | None:
    try:
        import jupyterlab  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed: pip install -e '.[browser]' (or make test installs it)"
    if chromium_path() is None:
        return (
            "no Chromium found: apt-get install chromium (Debian/Ubuntu; .ci/run does this), "
            "or set LABKIT_CHROMIUM=/path/to/chromium"
        )
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(_missing() is not None, reason=str(_missing())),
]


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting for its parent counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 with a token, stopped (with its kernels) by `stop`."""

    def __init__(self, root: Path, home: Path, data_dir: Path) -> None:
        self.root, self.home = root, home
        self.port, self.token = free_port(), secrets.token_hex(16)
        settings = home / "settings"
        for plugin, values in {
            # every cell in the page (no virtual scrolling), so the test sees all outputs
            "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
            "@jupyter-widgets/jupyterlab-manager/plugin": {"saveState": True},
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        }.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = {k: v for k, v in os.environ.items() if k != "LABKIT_NO_WIDGETS"}  # the kernels show widgets
        env.update(
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            LABKIT_DATA_DIR=str(data_dir),  # the dataset the pipeline run generated
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        self.log = open(home / "jupyterlab.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",  # CI runs as root
                "--ServerApp.terminals_enabled=False",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={root}",
                f"--LabApp.user_settings_dir={settings}",
                f"--LabApp.workspaces_dir={home / 'workspaces'}",
            ],
            cwd=root,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: see {self.home / 'jupyterlab.log'}")
            try:
                self.api("status")
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"JupyterLab did not answer in {timeout} s: see {self.home / 'jupyterlab.log'}")

    def kernel_pids(self) -> list[int]:
        """PIDs of the kernels this server started (its child processes)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        kernels = self.kernel_pids()
        try:
            for kernel in self.api("kernels") or []:
                self.api(f"kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        for pid in kernels:  # a kernel that outlived its server
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started_kernels = kernels
        self.log.close()


@pytest.fixture(scope="module")
def lab_folder(tmp_path_factory) -> Path:
    """A run folder from a tiny pipeline run (00, 02) and parameterised copies of 03 and 05 beside it."""
    import papermill

    tmp = tmp_path_factory.mktemp("browser")
    saved = os.environ.get("LABKIT_DATA_DIR")
    os.environ["LABKIT_DATA_DIR"] = str(tmp / "data")
    try:
        run = pipeline.run_pipeline(
            PARAMS, name="run", runs_dir=tmp / "runs", only=["00", "02"], progress=False
        )
    finally:
        if saved is None:
            os.environ.pop("LABKIT_DATA_DIR")
        else:
            os.environ["LABKIT_DATA_DIR"] = saved
    lab = tmp / "lab"
    lab.mkdir()
    for name in ("03_worst_queries", "05_search"):
        source = REPO / "notebooks" / f"{name}.ipynb"
        declared = pipeline.notebook_parameters(source)
        params = {k: v for k, v in {**PARAMS, **NOTEBOOK_EXTRA}.items() if k in declared}
        papermill.execute_notebook(
            str(source),
            str(lab / f"{name}.ipynb"),
            parameters={"run_dir": str(run.run_dir), **params},
            prepare_only=True,
            kernel_name="python3",
        )
    return lab


def accept_kernel_dialog(page) -> None:
    """Accept JupyterLab's "Select Kernel" dialog (Python 3 preselected) when it opens with the notebook."""
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    try:
        dialog.wait_for(timeout=5_000)
    except Exception:  # no dialog: the kernel started by itself
        return
    dialog.click()


def run_all_cells(page, failure_shot: Path, timeout_s: float = 60) -> None:
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    accept_kernel_dialog(page)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=60_000)
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    # done: the first cell has run and none is running or queued (after an error the rest stay blank)
    try:
        _wait_for_cells(page, timeout_s)
    except Exception:
        page.screenshot(path=failure_shot, full_page=True)
        raise


def _wait_for_cells(page, timeout_s: float) -> None:
    page.wait_for_function(
        """() => {
            const texts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                .map(p => p.textContent.trim());
            return texts.length > 0 && /[0-9]/.test(texts[0]) && !texts.some(t => t.includes('*'));
        }""",
        timeout=timeout_s * 1000,
        polling=250,
    )


def save(page, path: Path) -> dict:
    """Save the open notebook (Ctrl+S) and read it back once JupyterLab has written it."""
    before = path.stat().st_mtime_ns
    page.keyboard.press("Control+s")
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if path.stat().st_mtime_ns != before:
            try:
                return json.loads(path.read_text())
            except ValueError:  # still being written
                pass
        time.sleep(0.2)
    raise TimeoutError(f"{path} was not saved within 30 s")


def cell_errors(nb: dict) -> list[str]:
    found = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"{out['ename']}: {out['evalue']} in\n{''.join(cell['source'])[:300]}")
    return found


def panel(page, has_text: str):
    """The output area holding the widget with a control labelled `has_text`."""
    outputs = page.locator(
        ".jp-OutputArea-output.lm-Panel"
    )  # a widget view (rendered outputs are not panels)
    return outputs.filter(has=page.locator(".widget-label, button", has_text=re.compile(f"^{has_text}")))


def timed_picture_change(page, image, action) -> tuple[float, bytes, bytes]:
    """Run `action` and wait until the image's source changes; (milliseconds, screenshot before, after)."""
    image.scroll_into_view_if_needed()
    before_png = image.screenshot()
    handle = image.element_handle()
    old = handle.get_attribute("src")
    start = time.perf_counter()
    action()
    page.wait_for_function("([el, old]) => el.getAttribute('src') !== old", arg=[handle, old], timeout=30_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=handle, timeout=10_000)
    elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, before_png, image.screenshot()


def keep(path: Path) -> None:
    target = os.environ.get("LABKIT_BROWSER_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def test_panels_render_and_respond_in_chromium(lab_folder, tmp_path):
    from playwright.sync_api import sync_playwright

    server = JupyterLab(lab_folder, tmp_path / "jupyter", lab_folder.parent / "data")
    latencies: dict[str, float] = {}
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        server.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)

                # 03: result browser and embedding map
                page.goto(server.url("lab/workspaces/run03/tree/03_worst_queries.ipynb"))
                run_all_cells(page, shots / "03_failed.png")
                nb = save(page, lab_folder / "03_worst_queries.ipynb")
                assert cell_errors(nb) == []
                assert page.get_by_text(WIDGET_ERROR).count() == 0
                browser_panel = panel(page, "next")
                assert browser_panel.count() == 1
                image = browser_panel.locator("img.widget-image")
                next_button = browser_panel.locator("button", has_text="next")
                ms, before, after = timed_picture_change(page, image, next_button.click)
                latencies["result browser: next"] = ms
                assert before != after
                k_handle = browser_panel.locator(".widget-hslider", has_text=re.compile(r"^k")).locator(
                    ".noUi-handle"
                )
                ms, before, after = timed_picture_change(
                    page, image, lambda: (k_handle.focus(), k_handle.press("ArrowLeft"))
                )
                latencies["result browser: k"] = ms
                assert before != after
                browser_panel.screenshot(path=shots / "03_result_browser.png")

                map_panel = panel(page, "colour by")
                assert map_panel.count() == 1 and map_panel.locator("svg .dot").count() > 0
                map_image = map_panel.locator("img.widget-image")
                for n, dot_index in enumerate((7, 11), start=1):  # the first click also warms caches
                    dot = map_panel.locator("svg .dot").nth(dot_index)
                    ms, before, after = timed_picture_change(
                        page, map_image, lambda d=dot: d.dispatch_event("click")
                    )
                    latencies[f"embedding map: click a point ({n})"] = ms
                    assert before != after
                map_panel.screenshot(path=shots / "03_embedding_map.png")
                page.screenshot(path=shots / "03_page.png")

                # a saved 03 reopened without its kernel still shows the views (saved widget state)
                save(page, lab_folder / "03_worst_queries.ipynb")
                for kernel in server.api("kernels") or []:
                    server.api(f"kernels/{kernel['id']}", method="DELETE")
                page.goto(server.url("lab/workspaces/reopen03/tree/03_worst_queries.ipynb"))
                page.locator(".jp-Notebook").wait_for()
                reopened = panel(page, "next")
                reopened.locator("img.widget-image").wait_for(timeout=60_000)
                page.wait_for_function(
                    "el => el.complete && el.naturalWidth > 0",
                    arg=reopened.locator("img.widget-image").element_handle(),
                )
                assert page.get_by_text(WIDGET_ERROR).count() == 0
                reopened.scroll_into_view_if_needed()
                page.screenshot(path=shots / "03_reopened.png")

                # 05: live search
                page.goto(server.url("lab/workspaces/run05/tree/05_search.ipynb"))
                run_all_cells(page, shots / "05_failed.png")
                nb = save(page, lab_folder / "05_search.ipynb")
                assert cell_errors(nb) == []
                assert page.get_by_text(WIDGET_ERROR).count() == 0
                page.screenshot(path=shots / "05_page.png")
                search = panel(page, "stored")
                assert search.count() == 1, f"{search.count()} search panels"
                search_image = search.locator("img.widget-image")
                stored = search.locator(".widget-dropdown", has_text="stored").locator("select")
                ms, before, after = timed_picture_change(
                    page, search_image, lambda: stored.select_option(index=5)
                )
                latencies["search panel: pick a stored item"] = ms
                assert before != after
                k_search = search.locator(".widget-hslider", has_text=re.compile(r"^k")).locator(
                    ".noUi-handle"
                )
                ms, before, after = timed_picture_change(
                    page, search_image, lambda: (k_search.focus(), k_search.press("ArrowRight"))
                )
                latencies["search panel: k"] = ms
                assert before != after
                table = search.locator("table")
                assert table.locator("tbody tr").count() == NOTEBOOK_EXTRA["k"] + 1
                search.screenshot(path=shots / "05_search_panel.png")
            finally:
                browser.close()
    finally:
        server.stop()
    for shot in sorted(shots.glob("*.png")):
        keep(shot)
    print("\nclick-to-new-picture latency in Chromium (ms):")
    for name, ms in latencies.items():
        print(f"  {name:<36} {ms:7.0f}")
    print(f"screenshots: {shots}")
    assert server.process.poll() is not None  # JupyterLab stopped
    assert server.started_kernels and not [pid for pid in server.started_kernels if alive(pid)]
