"""A team's backends on a real PostgreSQL, started here in a temporary directory (`initdb` +
`pg_ctl`, a free loopback port) and stopped by its PID: `mlflow server` with the PostgreSQL backend
store, a `--smoke` sweep logging to it with its Optuna study in PostgreSQL, then `kdtune.report`
rebuilding the front from the server alone."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from test_server import HOST, MLFLOW, Server, children_of, env, free_port, report_cli, sweep_command

psycopg = pytest.importorskip("psycopg", reason="needs psycopg, SQLAlchemy's PostgreSQL driver (pip install -e '.[test]')")
BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
INITDB = shutil.which("initdb") or (BIN and shutil.which("initdb", path=BIN))
PG_CTL = shutil.which("pg_ctl") or (BIN and shutil.which("pg_ctl", path=BIN))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (INITDB and PG_CTL), reason="needs PostgreSQL's initdb and pg_ctl "
                                                                                   "(Debian: apt-get install postgresql)"),
              pytest.mark.skipif(MLFLOW is None, reason="needs the `mlflow` CLI")]
USER = "kdtune"


def as_owner() -> tuple[list[str], int | None]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user (Debian's package makes it)."""
    if os.geteuid() != 0:
        return [], None
    try:
        return ["runuser", "-u", "postgres", "--"], pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this test's own; yields a URL prefix `postgresql://kdtune@127.0.0.1:PORT/`."""
    prefix, uid = as_owner()
    root = Path(tempfile.mkdtemp(prefix="kdpg-"))
    if uid is not None:
        os.chown(root, uid, -1)
    data, port = root / "data", free_port()
    subprocess.run([*prefix, INITDB, "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True)
    started = subprocess.run([*prefix, PG_CTL, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
                              f"-c listen_addresses={HOST} -p {port} -k {root}", "start"], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr + (root / "server.log").read_text()
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        with psycopg.connect(host=HOST, port=port, user=USER, dbname="postgres", autocommit=True) as admin:
            for name in ("mlflow", "optuna"):
                admin.execute(f"CREATE DATABASE {name}")
        yield f"postgresql://{USER}@{HOST}:{port}/"
    finally:
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        for _ in range(120):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)


def test_sweep_on_postgresql_backends_and_report_rebuilt_from_them(postgres, tmp_path, mnist_root, teacher_cache):
    server = Server(tmp_path, backend=postgres + "mlflow")
    server.start()
    try:
        MlflowClient(server.uri).search_experiments()  # the server creates its tables on the first request
        extra = ["--set", "name=pg-kd", "--set", "search.num_samples=2", "--set", "search.baselines=false",
                 "--set", "search.confirm_seeds=0", "--set", f"search.optuna_storage={postgres}optuna"]
        done = subprocess.run(sweep_command(tmp_path, server.uri, mnist_root, *extra), cwd=tmp_path,
                              env=env(teacher_cache), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        out = tmp_path / "results" / "pg-kd"
        trials = pd.read_csv(out / "trials.csv")
        assert len(trials) == 2 and (trials["status"] == "FINISHED").all()

        parents, children = children_of(MlflowClient(server.uri), "pg-kd")
        assert len(parents) == 1 and sorted(r.info.run_id for r in children) == sorted(trials["mlflow_run_id"])
        assert not [r for r in children if r.info.status != "FINISHED"]
        with psycopg.connect(postgres + "mlflow") as db:  # the runs are in PostgreSQL
            finished = {row[0] for row in db.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED'")}
        assert set(trials["mlflow_run_id"]) <= finished
        study_name = parents[0].data.tags["kdtune.optuna_study"]
        assert parents[0].data.tags["kdtune.optuna_storage"] == postgres + "optuna"
        study = optuna.load_study(study_name=study_name, storage=postgres + "optuna")
        assert sorted(round(t.values[0], 6) for t in study.trials) == sorted(round(v, 6) for v in trials["val_acc"])

        hidden = tmp_path / "results-hidden"  # the report reads the server alone
        (tmp_path / "results").rename(hidden)
        report = report_cli(["pg-kd", "--tracking-uri", server.uri, "--out", str(tmp_path / "rep")], tmp_path)
        assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
        key = ["trial_id", "params", "val_acc", "test_acc"]
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "rep" / "pareto.csv")[key],
                                      pd.read_csv(hidden / "pg-kd" / "pareto.csv")[key], check_dtype=False)
    finally:
        server.stop()
