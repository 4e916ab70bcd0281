"""kdtune against a real `mlflow server` (sqlite backend, proxied artifacts, a loopback port), started
and stopped by PID here: a --smoke sweep logging to it, the report rebuilt from it, the logged
student, the registry, the Optuna study, the report page in headless Chromium, and the server
killed mid-sweep: restarted (nothing lost) or left down (results/ complete, then --sync)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import LIGHT_SMOKE, SPEC

HOST = "127.0.0.1"
MLFLOW = shutil.which("mlflow")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MLFLOW is None, reason="needs the `mlflow` CLI")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` in its own process group; stop() kills that group (its uvicorn worker and
    job runner), found by the PID this test started."""

    def __init__(self, root: Path, backend: str | None = None):
        self.root, self.port, self.proc = root, free_port(), None
        self.backend = backend or f"sqlite:///{root / 'server.db'}"
        self.uri = f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 120) -> None:
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", self.backend, "--serve-artifacts",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", HOST, "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
        raise AssertionError(f"mlflow server did not answer in {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test created with start_new_session
            self.proc.wait(timeout=30)
        elif self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind by a dead server
            except OSError:
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    srv = Server(root)
    srv.start()
    yield srv
    srv.stop()


def sweep_command(cwd: Path, uri: str, mnist_root: Path, *extra: str) -> list[str]:
    light = [a for s in LIGHT_SMOKE for a in ("--set", s)]
    return [sys.executable, "-m", "kdtune.sweep", str(SPEC), "--smoke", "--results-dir", str(cwd / "results"),
            "--tracking-uri", uri, "--set", f"data.root={mnist_root}", *light, *extra]


def env(teacher_cache: Path, **more) -> dict:
    return {**os.environ, "KDTUNE_CACHE": str(teacher_cache), "PYTHONUNBUFFERED": "1", **more}


def report_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdtune.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def children_of(client: MlflowClient, experiment: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


@pytest.fixture(scope="module")
def smoke(server, tmp_path_factory, mnist_root, teacher_cache):
    cwd = tmp_path_factory.mktemp("server-smoke")
    done = subprocess.run(sweep_command(cwd, server.uri, mnist_root), cwd=cwd, env=env(teacher_cache),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = cwd / "results" / "mnist-kd"
    return {"cwd": cwd, "out": out, "stdout": done.stdout, "client": MlflowClient(server.uri),
            "trials": pd.read_csv(out / "trials.csv"), "summary": json.loads((out / "summary.json").read_text())}


def test_smoke_sweep_logs_every_trial_to_the_server(smoke, server):
    client, trials = smoke["client"], smoke["trials"]
    parents, children = children_of(client, "mnist-kd")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert sorted(r.info.run_id for r in children) == sorted(trials["mlflow_run_id"])
    assert not [r for r in children if r.info.status == "RUNNING"]
    for run in children:
        tags = run.data.tags
        row = trials[trials["mlflow_run_id"] == run.info.run_id].iloc[0]
        assert tags["kdtune.loss"] == row["loss"] == run.data.params["loss"]
        assert int(tags["kdtune.params"]) == int(run.data.metrics["params"]) == int(row["params"])
        assert tags["kdtune.sweep"] == parent.info.run_id and tags["kdtune.student"] == row["student"]
    optuna = smoke["summary"]["optuna"]
    assert optuna["storage"].startswith("sqlite:////") and optuna["study_name"]
    assert parent.data.tags["kdtune.optuna_storage"] == optuna["storage"]
    assert parent.data.tags["kdtune.optuna_study"] == optuna["study_name"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}  # proxied by the server
    assert {"report/report.html", "report/pareto.csv", "report/hypervolume.json"} <= artifacts
    assert (smoke["out"] / "report" / "report.html").is_file()


def test_report_rebuilt_from_mlflow_has_the_sweeps_front(smoke, server, tmp_path):
    hidden = smoke["cwd"] / "results-hidden"  # the report reads MLflow alone: results/ is out of reach
    (smoke["cwd"] / "results").rename(hidden)
    try:
        done = report_cli(["mnist-kd", "--tracking-uri", server.uri, "--out", str(tmp_path / "rep")], tmp_path)
    finally:
        hidden.rename(smoke["cwd"] / "results")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mine = pd.read_csv(tmp_path / "rep" / "pareto.csv")
    swept = pd.read_csv(smoke["out"] / "pareto.csv")
    key = ["source_trial", "params", "val_acc", "test_acc", "test_acc_std", "seeds"]
    assert "seeds" in swept.columns and len(swept) >= 1  # the sweep's confirmed front
    pd.testing.assert_frame_equal(mine[key].reset_index(drop=True), swept[key].reset_index(drop=True),
                                  check_dtype=False)
    rebuilt = pd.read_csv(tmp_path / "rep" / "trials.csv")
    assert sorted(rebuilt["mlflow_run_id"]) == sorted(smoke["trials"]["mlflow_run_id"])
    merged = rebuilt.merge(smoke["trials"], on="mlflow_run_id", suffixes=("", "_sweep"))
    for column in ("trial_id", "phase", "loss", "status"):
        assert (merged[column] == merged[f"{column}_sweep"]).all(), column
    assert (merged["val_acc"] - merged["val_acc_sweep"]).abs().max() == 0
    gain = pd.read_csv(tmp_path / "rep" / "kd_gain.csv")
    assert gain[["gain", "ci95_low", "ci95_high"]].to_numpy() == pytest.approx(
        pd.DataFrame(smoke["summary"]["kd_gain"])[["gain", "ci95_low", "ci95_high"]].to_numpy())
    methods = pd.read_csv(tmp_path / "rep" / "methods.csv")
    search = smoke["trials"][smoke["trials"]["phase"] == "search"]
    assert dict(zip(methods["method"], methods["trials"])) == search["loss"].value_counts().to_dict()
    volume = json.loads((tmp_path / "rep" / "hypervolume.json").read_text())
    assert volume["reference_point"] == {"val_acc": 0.0, "params": 1_000_000.0} and volume["hypervolume"] > 0
    assert "Hypervolume of the front" in done.stdout and "reference point val_acc = 0" in done.stdout
    assert "Parameter importances for val_acc" in done.stdout
    importances = pd.read_csv(tmp_path / "rep" / "importances.csv")
    assert len(importances) >= 1 and importances["importance"].sum() == pytest.approx(1.0)
    print(done.stdout)  # the note attaches what kdtune.report printed


def test_front_student_loads_and_reproduces_its_test_accuracy(smoke, server, mnist_root):
    import mlflow
    import mlflow.pytorch
    import torch
    import torchvision

    client, trials = smoke["client"], smoke["trials"]
    front = pd.read_csv(smoke["out"] / "pareto.csv")
    confirm = trials[trials["phase"] == "confirm"]
    assert len(confirm) > 0
    for run_id in confirm["mlflow_run_id"]:  # every confirmation run's student is a model
        assert client.get_run(run_id).data.tags["kdtune.model_uri"].startswith("models:/")
    test = torchvision.datasets.MNIST(str(mnist_root), train=False, download=False)
    limit = smoke["summary"]["spec"]["data"]["test_limit"]
    images = test.data[:limit].unsqueeze(1).float() / 255  # what ToTensor gives: [0, 1], N x 1 x 28 x 28
    labels = test.targets[:limit]
    mlflow.set_tracking_uri(server.uri)
    best = front.sort_values("val_acc").iloc[-1]
    search_run = trials[(trials["trial_id"] == best["source_trial"]) & (trials["phase"] == "search")].iloc[0]
    checked = [search_run["mlflow_run_id"], confirm["mlflow_run_id"].iloc[0]]
    for run_id in checked:
        run = client.get_run(run_id)
        model = mlflow.pytorch.load_model(run.data.tags["kdtune.model_uri"])
        with torch.no_grad():
            accuracy = (model(images).argmax(1) == labels).sum().item() / len(labels)  # as kdtune counts it
        assert accuracy == pytest.approx(run.data.metrics["test_acc"], abs=1e-9), run_id
    info = mlflow.models.get_model_info(client.get_run(checked[0]).data.tags["kdtune.model_uri"])
    assert info.signature is not None and tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)


def test_register_creates_a_model_version_within_the_size(smoke, server, tmp_path):
    front = pd.read_csv(smoke["out"] / "pareto.csv")
    limit = int(front["params"].min())  # only the smallest front student fits
    done = report_cli(["mnist-kd", "--tracking-uri", server.uri, "--out", str(tmp_path / "rep"),
                       "--register", "kdtune-student", "--max-params", str(limit)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = smoke["client"]
    versions = client.search_model_versions("name = 'kdtune-student'")
    assert len(versions) == 1
    version = versions[0]
    smallest = front.sort_values("params").iloc[0]
    assert version.tags["kdtune.trial_id"] == smallest["source_trial"]
    assert int(version.tags["kdtune.params"]) == limit and version.tags["kdtune.loss"] == smallest["loss"]
    assert f"loss {smallest['loss']}" in version.description and "[0, 1]" in version.description
    import mlflow
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pytorch.load_model(f"models:/kdtune-student/{version.version}")
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    refused = report_cli(["mnist-kd", "--tracking-uri", server.uri, "--out", str(tmp_path / "rep2"),
                          "--register", "kdtune-student", "--max-params", str(limit - 1)], tmp_path)
    assert refused.returncode == 2 and "no front student has at most" in refused.stderr


def test_optuna_study_holds_the_search_trials(smoke):
    import optuna

    optuna_info = smoke["summary"]["optuna"]
    study = optuna.load_study(study_name=optuna_info["study_name"], storage=optuna_info["storage"])
    search = smoke["trials"][smoke["trials"]["phase"] == "search"]
    assert len(study.trials) == len(search)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == (search["status"] == "FINISHED").sum()
    assert sorted(round(t.values[0], 6) for t in complete) == sorted(
        round(v, 6) for v in search[search["status"] == "FINISHED"]["val_acc"])
    assert {"loss", "student.arch", "train.lr"} <= set(complete[0].params)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_report_page_renders_the_plot_in_headless_chromium(smoke, tmp_path):
    from PIL import Image

    page = smoke["out"] / "report" / "report.html"
    text = page.read_text()
    assert "<script src=" not in text and "cdn.plot.ly" not in text.split("Plotly.newPlot")[0][-2000:]
    shot = tmp_path / "report.png"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=10000", f"--screenshot={shot}", "--window-size=1200,900",
                           "--user-data-dir=" + str(tmp_path / "profile"), page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    # the page has no saturated colour but what plotly's JS draws: the trial markers and the colour scale
    saturated = sum(n for n, (r, g, b) in image.getcolors(maxcolors=2_000_000) if max(r, g, b) - min(r, g, b) > 80)
    assert saturated > 500, f"{saturated} saturated pixels: the plot was not drawn"
    shutil.copy(shot, smoke["out"] / "report" / "screenshot.png")  # to look at


def run_until(proc: subprocess.Popen, marker: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return
    raise AssertionError("".join(lines)[-3000:])


def test_server_killed_and_restarted_mid_sweep_loses_no_run(server, tmp_path, mnist_root, teacher_cache):
    extra = ["--set", "name=restart-kd", "--set", "search.confirm_seeds=1"]
    proc = subprocess.Popen(sweep_command(tmp_path, server.uri, mnist_root, *extra), cwd=tmp_path,
                            env=env(teacher_cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        run_until(proc, "[2/", lines)  # two search trials done, the rest running or queued
        server.stop()
        time.sleep(3)
        server.start()
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=900) == 0, "".join(lines)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    trials = pd.read_csv(tmp_path / "results" / "restart-kd" / "trials.csv")
    client = MlflowClient(server.uri)
    parents, children = children_of(client, "restart-kd")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(trials) == trials["trial_id"].nunique()  # no run lost, no duplicate
    assert sorted(r.info.run_id for r in children) == sorted(trials["mlflow_run_id"])
    assert sorted(r.data.tags["kdtune.trial_id"] for r in children) == sorted(trials["trial_id"])
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert (trials["status"] == "FINISHED").all()
    for run in children:
        row = trials[trials["mlflow_run_id"] == run.info.run_id].iloc[0]
        assert run.data.metrics["val_acc"] == pytest.approx(row["val_acc"])
        assert run.data.tags["kdtune.status"] == "FINISHED"
    assert not (tmp_path / "results" / "restart-kd" / "mlflow_missing.json").exists()


def test_server_that_stays_down_leaves_results_complete_and_sync_uploads_them(server, tmp_path, mnist_root,
                                                                               teacher_cache):
    extra = ["--set", "name=down-kd", "--set", "search.confirm_seeds=0"]
    # fail fast once the server is gone: one retry, not a minute of them, per request
    proc = subprocess.Popen(sweep_command(tmp_path, server.uri, mnist_root, *extra), cwd=tmp_path,
                            env=env(teacher_cache, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        run_until(proc, "MLflow: experiment 'down-kd', parent run", lines)  # the parent exists; then the server dies
        server.stop()
        lines += proc.stdout.readlines()
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.start()
    output = "".join(lines)
    out = tmp_path / "results" / "down-kd"
    assert code == 3, output[-4000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 + 5 and (trials["status"] == "FINISHED").all()  # results/ complete
    for name in ("pareto.csv", "pareto.png", "summary.json", "report/report.html"):
        assert (out / name).is_file(), name
    missing = json.loads((out / "mlflow_missing.json").read_text())
    assert set(trials["trial_id"]) <= set(missing["missing"])
    saved = sorted(p.name for p in (out / "models").glob("*.pt"))  # the front's deployable students, for --sync
    assert saved == sorted(f"search-{t}.pt" for t in trials[trials["search_front"]]["trial_id"])
    assert "MLflow is missing or incomplete for" in output and sorted(trials["trial_id"])[0] in output

    done = report_cli(["--sync", str(tmp_path / "results")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(server.uri)
    parents, children = children_of(client, "down-kd")
    synced = pd.read_csv(out / "trials.csv")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(synced) and sorted(r.info.run_id for r in children) == sorted(synced["mlflow_run_id"])
    assert not [r for r in children if r.info.status == "RUNNING"]
    for run in children:
        row = synced[synced["mlflow_run_id"] == run.info.run_id].iloc[0]
        assert run.data.tags["kdtune.trial_id"] == row["trial_id"] and run.data.tags["kdtune.status"] == "FINISHED"
        assert run.data.metrics["test_acc"] == pytest.approx(row["test_acc"])
    on_front = synced[synced["search_front"]]
    assert len(on_front) >= 1
    for run_id in on_front["mlflow_run_id"]:  # front students logged from what the sweep saved
        assert client.get_run(run_id).data.tags["kdtune.model_uri"].startswith("models:/")
    assert not (out / "mlflow_missing.json").exists() and not (out / "models").exists()
    again = report_cli(["down-kd", "--tracking-uri", server.uri, "--out", str(tmp_path / "rep")], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(pd.read_csv(tmp_path / "rep" / "pareto.csv")["trial_id"]) == sorted(
        pd.read_csv(out / "pareto.csv")["trial_id"])
