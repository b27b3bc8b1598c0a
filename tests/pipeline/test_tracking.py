"""MLflow tracking: parent/child runs per session, stage wrapper exit codes, `sui ui` start/stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages import cli, common, tracking
from sui_core.errors import ParamError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SUI_SESSION_KEY", raising=False)
    monkeypatch.delenv("SUI_TRACKING", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return uri


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client, filter_string=""):
    exp = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    return client.search_runs([exp.experiment_id], filter_string=filter_string)


def _parents(client):
    return [r for r in _runs(client) if tracking.PARENT_TAG not in r.data.tags]


def test_tracking_uri_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "sub"))  # what DVC sets for stage commands
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'sub').resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.tracking_uri() == "sqlite:////elsewhere/x.db"


def test_dvc_command_detection():
    assert tracking._is_dvc_pipeline_cmd(["/v/bin/python", "/v/bin/dvc", "repro", "-f"])
    assert tracking._is_dvc_pipeline_cmd(["dvc", "exp", "run", "-S", "a=1"])
    assert tracking._is_dvc_pipeline_cmd(["python", "-m", "dvc", "exp", "exec-run", "--infofile", "x"])
    assert not tracking._is_dvc_pipeline_cmd(["bash", "run.sh", "repro"])
    assert not tracking._is_dvc_pipeline_cmd(["python", "-m", "stages.prepare"])
    assert not tracking._is_dvc_pipeline_cmd(["dvc", "status"])


def test_session_key_standalone_is_stable(monkeypatch):
    monkeypatch.delenv("SUI_SESSION_KEY", raising=False)
    key = tracking.session_key()
    assert key == tracking.session_key()
    if tracking.dvc_ancestor() is None:
        assert key.startswith(f"{os.getpid()}-")
    monkeypatch.setenv("SUI_SESSION_KEY", "forced")
    assert tracking.session_key() == "forced"


def test_same_session_one_parent_two_children(mlflow_uri, tmp_path):
    art = tmp_path / "a.txt"
    art.write_text("hello")
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "p.txt").write_text("plot")
    all_params = {"data": {"seed": 3, "classes": [1, 2]}, "training": {"lr": 0.5}}

    with tracking.stage_run(
        "prepare", {"data": {"seed": 3, "classes": [1, 2]}}, all_params=all_params, session="k1"
    ) as run:
        run.log_metrics({"n_train": 10, "nested": {"acc": 0.5}})
        run.log_artifact(art)
        run.set_tags({"custom": "yes"})
    with tracking.stage_run("model", {"training": {"lr": 0.5}}, all_params=all_params, session="k1") as run:
        run.log_metrics({"loss": 1.25})
        run.log_artifacts(folder, "plots")

    client = _client(mlflow_uri)
    parents = _parents(client)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None
    assert parent.data.tags[tracking.SESSION_TAG] == "k1"
    assert parent.data.params == {"data.seed": "3", "data.classes": "[1, 2]", "training.lr": "0.5"}
    commit = tracking._code()["git_commit"]
    if commit:
        assert parent.data.tags["mlflow.source.git.commit"] == commit

    children = _runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {c.data.tags[tracking.STAGE_TAG]: c for c in children}
    assert set(by_stage) == {"prepare", "model"}
    prep, model = by_stage["prepare"], by_stage["model"]
    assert prep.info.status == model.info.status == "FINISHED"
    assert prep.data.params == {"data.seed": "3", "data.classes": "[1, 2]"}
    assert prep.data.metrics == {"n_train": 10.0, "nested.acc": 0.5}
    assert prep.data.tags["custom"] == "yes"
    assert [f.path for f in client.list_artifacts(prep.info.run_id)] == ["a.txt"]
    assert model.data.params == {"training.lr": "0.5"}
    assert model.data.metrics == {"loss": 1.25}
    assert [f.path for f in client.list_artifacts(model.info.run_id, "plots")] == ["plots/p.txt"]
    # the parent's end time moves on with the last child
    assert parent.info.end_time >= max(prep.info.end_time, model.info.end_time)

    with tracking.stage_run("other", {}, session="k2"):
        pass
    assert len(_parents(client)) == 2


def test_exception_marks_child_failed(mlflow_uri):
    with pytest.raises(ParamError):
        with tracking.stage_run("loo", {"loo": {"tol": 1e-9}}, session="k3"):
            raise ParamError("loo.tol", "too small")
    client = _client(mlflow_uri)
    (parent,) = _parents(client)
    (child,) = _runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.info.status == "FAILED"
    assert "loo.tol" in child.data.tags["sui.error"]
    assert parent.info.status == "FAILED"


def test_dvc_exp_name_tags_parent(mlflow_uri, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    with tracking.stage_run("prepare", {}, session="k4"):
        pass
    (parent,) = _parents(_client(mlflow_uri))
    assert parent.data.tags["sui.dvc_exp_name"] == "lucky-lark"
    assert parent.info.run_name == "lucky-lark"


def test_tracking_off_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("SUI_TRACKING", "off")
    with tracking.stage_run("prepare", {"a": 1}) as run:
        run.log_metrics({"x": 1})
    assert not (tmp_path / "m.db").exists()


# ---- stages.common -------------------------------------------------------------------------------


def _write_params(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_run_stage_logs_params_and_metrics(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("SUI_SESSION_KEY", "k5")
    params = _write_params(
        tmp_path / "params.yaml",
        """\
        score: {sigma: 2.0}
        training: {lr: 0.1}
    """,
    )
    seen = {}

    def body(cfg, run):
        seen["sigma"] = cfg.score.sigma
        seen["same"] = cfg["score"] is cfg.score
        return {"fsi_mean": 0.25}

    app = common.stage_app("score", "Score samples.", body, sections=["score"])
    result = CliRunner().invoke(app, ["--params", str(params)])
    assert result.exit_code == 0, result.output
    assert seen == {"sigma": 2.0, "same": True}
    client = _client(mlflow_uri)
    (parent,) = _parents(client)
    assert parent.data.params["training.lr"] == "0.1"  # the whole params.yaml on the parent
    (child,) = _runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.data.params["score.sigma"] == "2.0"
    assert child.data.params["score.gallery_size"] == "10"  # defaults filled in by the config
    assert "training.lr" not in child.data.params
    assert child.data.metrics == {"fsi_mean": 0.25}


def test_run_stage_sui_error_is_one_line_exit_1(mlflow_uri, tmp_path):
    params = _write_params(tmp_path / "params.yaml", "score: {sigma: -1}\n")
    app = common.stage_app("score", "Score samples.", lambda cfg, run: {}, sections=["score"])
    result = CliRunner().invoke(app, ["--params", str(params)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["error: params.yaml: score.sigma: must be in (0.0, inf), got -1.0"]
    assert "Traceback" not in result.output


def test_stage_module_subprocess_error_and_interrupt(mlflow_uri, tmp_path):
    """As DVC runs it: `python -m <module>`; a SuiError in the body gives exit 1, one stderr line."""
    pkg = tmp_path / "fakestages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "boom.py").write_text(
        textwrap.dedent('''\
        """A stage that fails."""
        import os
        from stages.common import stage_app
        from sui_core.errors import DataError

        def body(cfg, run):
            if os.environ.get("BOOM") == "interrupt":
                raise KeyboardInterrupt
            raise DataError("data/raw/x.npz: missing arrays ['y']\\nsecond line")

        app = stage_app("boom", __doc__, body, sections=["data"])
        if __name__ == "__main__":
            app()
    ''')
    )
    (tmp_path / "params.yaml").write_text("data: {source: sklearn_digits}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "fakestages.boom"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: data/raw/x.npz: missing arrays ['y'] second line"]
    proc = subprocess.run(
        [sys.executable, "-m", "fakestages.boom"],
        cwd=tmp_path,
        env={**env, "BOOM": "interrupt"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    client = _client(mlflow_uri)
    statuses = sorted(r.info.status for r in _runs(client) if tracking.PARENT_TAG in r.data.tags)
    assert statuses == ["FAILED", "KILLED"]
    assert len(_parents(client)) == 2  # standalone runs: one parent each


def test_cli_registers_stage_modules_lazily(monkeypatch, tmp_path):
    import stages

    extra = tmp_path / "extra_stages"
    extra.mkdir()
    (extra / "fakestage.py").write_text(
        textwrap.dedent('''\
        """A fake stage for the CLI test."""
        from stages.common import stage_app

        def body(cfg, run):
            print("fake body ran")
            return {}

        app = stage_app("fakestage", __doc__, body, sections=[])
    ''')
    )
    monkeypatch.setattr(stages, "__path__", [*stages.__path__, str(extra)])
    monkeypatch.setattr(cli, "STAGE_MODULES", ["fakestage", "does_not_exist_yet"])
    monkeypatch.delitem(sys.modules, "stages.fakestage", raising=False)
    monkeypatch.setenv("SUI_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    cli.stage_command.cache_clear()
    cli._stage_spec.cache_clear()
    try:
        result = CliRunner().invoke(cli.app, ["--help"])
        assert result.exit_code == 0, result.output
        assert "fakestage" in result.output and "A fake stage for the CLI test." in result.output
        assert "ui" in result.output and "does_not_exist_yet" not in result.output
        assert "stages.fakestage" not in sys.modules  # listing does not import stage modules
        result = CliRunner().invoke(cli.app, ["fakestage", "--help"])
        assert result.exit_code == 0 and "--params" in result.output, result.output
        result = CliRunner().invoke(cli.app, ["fakestage"])
        assert result.exit_code == 0 and "fake body ran" in result.output, result.output
        result = CliRunner().invoke(cli.app, ["does_not_exist_yet"])
        assert result.exit_code == 2
    finally:
        cli.stage_command.cache_clear()
        cli._stage_spec.cache_clear()


def test_cli_help_lists_existing_stages():
    result = CliRunner().invoke(cli.app, ["--help"])
    assert result.exit_code == 0, result.output
    for name in cli.STAGE_MODULES:
        assert (name in result.output) == (cli._stage_spec(name) is not None)


# ---- sui ui --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_sui_ui_starts_and_stops_cleanly(tmp_path):
    import psutil

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "ui", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "mlflow UI did not answer within 60 s"
                time.sleep(0.5)
        server_pgids = {os.getpgid(c.pid) for c in psutil.Process(proc.pid).children(recursive=True)}
        server_pgids.discard(os.getpgid(proc.pid))
        assert server_pgids, "the server should run in its own process group"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        out = proc.stdout.read().decode()
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}" in out
        for pgid in server_pgids:
            assert _group_gone(pgid), f"processes of group {pgid} are still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
