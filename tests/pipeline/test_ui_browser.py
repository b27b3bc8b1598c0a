"""The MLflow UI as a user sees it, in a real browser: headless Chromium (Debian package `chromium`)
driven over its DevTools protocol with the standard library only. After a `dvc repro` and a
`dvc exp run`, `sui ui` lists both parent runs in the runs table, a stage-prefixed metric can be shown
as a column with each parent's value, and the compare page of the two parents lists their metrics.
The screenshots are kept in .artifacts/ (gitignored; README's docs/img/mlflow_compare.png is one)."""

import base64
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pipeline_project import ROOT, env_for, make_project, run

CHROMIUM = shutil.which("chromium")
ARTIFACTS = ROOT / ".artifacts"
METRIC = "evaluate.fsi_auroc"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian package `chromium` is not installed (as root, "
        "`bash run.sh test` installs it; else apt-get install chromium)",
    ),
]


# ---- a minimal DevTools protocol client (one page, JSON over a websocket) -------------------------


class DevToolsPage:
    """One browser tab: `call` a DevTools method, `js` evaluates an expression and returns its value."""

    def __init__(self, ws_url: str):
        netloc, path = urllib.parse.urlsplit(ws_url)[1:3]
        host, port = netloc.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.last_id = 0

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("chromium closed the DevTools connection")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _message(self) -> dict:
        data = b""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size >= 126:
                size = int.from_bytes(self._read(2 if size == 126 else 8), "big")
            data += self._read(size)
            if first & 0x80:  # the final fragment
                return json.loads(data)

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        payload = json.dumps({"id": self.last_id, "method": method, "params": params}).encode()
        n = len(payload)
        length = (
            bytes([0x80 | n])
            if n < 126
            else (
                bytes([0x80 | 126]) + struct.pack(">H", n)
                if n < 1 << 16
                else bytes([0x80 | 127]) + struct.pack(">Q", n)
            )
        )
        mask = os.urandom(4)
        self.sock.sendall(b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:  # events arrive in between; the answer carries our id
            reply = self._message()
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str, timeout: float = 60):
        """Poll until the JS `expression` is truthy (the UI renders after its API calls); return it."""
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"  # mid-navigation
        while time.monotonic() < deadline:
            value = self.js(guarded)
            if value:
                return value
            time.sleep(0.3)
        text = self.js("document.body ? document.body.innerText : ''") or ""
        raise AssertionError(f"{what}: not on the page within {timeout:g} s; the page shows: {text[:2000]}")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"screenshot: {path}")
        return path


@pytest.fixture()
def browser(tmp_path):
    """Headless Chromium with a fresh profile; yields its one page; stopped at the end."""
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1500,950",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as resp:
            target = next(t for t in json.load(resp) if t["type"] == "page")
        page = DevToolsPage(target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the project and its UI ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A small project after `dvc repro` (t = 300) and `dvc exp run -S training.t=200`, with the
    fsi_auroc each wrote to data/metrics/evaluate.json."""
    path = make_project(tmp_path_factory.mktemp("sui-ui"))
    run(["dvc", "repro"], path)
    auroc = {"repro": _auroc(path)}
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "after repro"], path)
    run(["dvc", "exp", "run", "-S", "training.t=200", "-n", "short-training"], path)
    auroc["short-training"] = _auroc(path)
    return {"path": path, "auroc": auroc}


def _auroc(path: Path) -> float:
    return json.loads((path / "data/metrics/evaluate.json").read_text())["fsi_auroc"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ui(project):
    """`sui ui` on a free port, serving the project's runs; yields its URL; stopped (Ctrl-C) at the end."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "sui"), "ui", "--port", str(port)],
        cwd=project["path"],
        env=env_for(project["path"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        printed = proc.stderr.readline().decode()  # `MLflow UI: <url of the runs table>  (...)`
        assert printed.startswith(f"MLflow UI: {url}/#/experiments/"), printed
        project["printed_url"] = printed.split()[2]
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "sui ui did not answer within 90 s"
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _parents(project) -> tuple[str, dict[str, str]]:
    """The experiment id and {run name: run id} of the parent runs (from MLflow's API, not the UI)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env_for(project["path"])["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sui")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = {r.info.run_name: r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    return experiment.experiment_id, names


# a table row of the runs grid is split into a pinned and a scrolled part: join them by row index
ROWS_JS = """(() => { const rows = {};
  for (const part of document.querySelectorAll('.ag-row[row-index]')) {
    const i = part.getAttribute('row-index'); rows[i] = (rows[i] || '') + ' ' + part.innerText.replace(/\\s+/g, ' ');
  }
  return Object.values(rows); })()"""

SHOW_COLUMN_JS = """((name) => {
  const node = [...document.querySelectorAll('[data-testid=column-selector-tree] .du-bois-light-tree-treenode')]
    .find(e => e.innerText.trim() === name);
  if (!node) return false;
  node.querySelector('.du-bois-light-tree-checkbox').click();
  return true; })"""


def _click_button(page: DevToolsPage, label: str) -> None:
    assert page.js(f"""(() => {{ const b = [...document.querySelectorAll('button')]
      .find(e => e.innerText.trim() === {json.dumps(label)}); if (b) b.click(); return !!b; }})()"""), label


def _close_assistant(page: DevToolsPage) -> None:
    """MLflow 3.17 opens its assistant panel on first use; it hides half the table (not needed here)."""
    page.js("document.querySelector('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")


def test_runs_table_lists_both_parents_with_a_stage_metric_column(project, ui, browser):
    experiment_id, parents = _parents(project)
    assert set(parents) >= {"short-training"} and len(parents) == 2, parents
    # the URL `sui ui` prints: MLflow 3 would open the experiment on its GenAI overview without it
    assert project["printed_url"] == f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    browser.goto(project["printed_url"])
    browser.wait_for(
        f"location.hash.includes('/runs') && !location.hash.includes('overview') && "
        f"!!document.querySelector('.ag-row[row-index]') && "
        f"{json.dumps(list(parents))}.every(n => document.body.innerText.includes(n))",
        "both parent runs in the runs table (not the GenAI overview)",
    )
    _close_assistant(browser)
    _click_button(browser, "Columns")
    browser.wait_for("!!document.querySelector('input[placeholder=\"Search columns\"]')", "the column selector")
    browser.js("document.querySelector('input[placeholder=\"Search columns\"]').focus()")
    browser.call("Input.insertText", text=METRIC)
    browser.wait_for(
        "[...document.querySelectorAll('[data-testid=column-selector-tree] .du-bois-light-tree-treenode')]"
        ".some(e => e.innerText.trim() === 'Metrics (1)')",
        f"the column selector filtered to {METRIC}",
    )
    assert browser.wait_for(f"({SHOW_COLUMN_JS})({json.dumps(METRIC)})", f"{METRIC} in the column selector")
    _key(browser, "Escape", 27)
    header = browser.wait_for(
        f"[...document.querySelectorAll('[role=columnheader]')].find(e => "
        f"e.getAttribute('col-id') === {json.dumps(f'metrics.`{METRIC}`')})?.innerText",
        f"a {METRIC} column",
    )
    assert METRIC in header, header
    rows = browser.wait_for(
        f"(() => {{ const r = {ROWS_JS}; return r.filter(t => /\\d\\.\\d{{4}}/.test(t)).length >= 2 && r; }})()",
        f"{METRIC} values in the parents' rows",
    )
    for name in parents:  # the repro's parent is named `repro <commit>`
        row = next(r for r in rows if f" {name} " in f"{r} ")
        expected = project["auroc"]["short-training" if name == "short-training" else "repro"]
        shown = [float(x) for x in re.findall(r"\d+\.\d{4,}", row)]
        assert any(math.isclose(x, expected, rel_tol=1e-6) for x in shown), (name, expected, row)
    browser.screenshot(ARTIFACTS / "mlflow_runs.png")


def _key(page: DevToolsPage, key: str, code: int) -> None:
    page.call("Input.dispatchKeyEvent", type="keyDown", key=key, code=key, windowsVirtualKeyCode=code)
    page.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=key, windowsVirtualKeyCode=code)


def _plot_metrics(page: DevToolsPage, names: list[str]) -> None:
    """Put `names` on the compare page's parallel-coordinates plot instead of MLflow's first metric."""
    metrics_select = "document.querySelectorAll('.du-bois-light-select')[1]"
    page.js(f"{metrics_select}.querySelector('input').focus()")
    _key(page, "Backspace", 8)  # removes the one metric MLflow put there
    for name in names:
        page.call("Input.insertText", text=name)
        page.wait_for(
            f"[...document.querySelectorAll('.du-bois-light-select-item-option')].some(e => "
            f"e.innerText.trim() === {json.dumps(name)})",
            f"{name} among the plot's metrics",
        )
        _key(page, "Enter", 13)
    _key(page, "Escape", 27)
    page.wait_for(
        f"JSON.stringify([...{metrics_select}.querySelectorAll('.du-bois-light-select-selection-item')]"
        f".map(e => e.innerText.trim())) === {json.dumps(json.dumps(names, separators=(',', ':')))}",
        f"{names} plotted",
    )


def test_compare_page_of_the_two_parents_lists_their_metrics(project, ui, browser):
    experiment_id, parents = _parents(project)
    query = urllib.parse.urlencode(
        {"runs": json.dumps(list(parents.values())), "experiments": json.dumps([experiment_id])}
    )
    browser.goto(f"{ui}/#/compare-runs?{query}")
    text = browser.wait_for(
        "document.body.innerText.includes('Run details') && document.body.innerText", "the compare page"
    )
    assert all(name in text for name in parents) and "training.t" in text, text[:2000]
    # the metrics table (it renders its first rows only): the parents' metrics, prefixed by stage
    metrics = text[text.rindex("Metrics", 0, text.rindex("Artifacts")) :].splitlines()
    assert sum(line.startswith("evaluate.") for line in metrics) >= 10, metrics[:20]
    _close_assistant(browser)
    _plot_metrics(browser, ["loo.train_mse", METRIC])
    browser.js("document.querySelector('button[aria-label=\"Parameters - Show diff only\"]').click()")
    browser.call("Emulation.setDeviceMetricsOverride", width=1500, height=1500, deviceScaleFactor=1, mobile=False)
    time.sleep(1)  # the plot redraws
    browser.screenshot(ARTIFACTS / "mlflow_compare.png")
