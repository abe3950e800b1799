"""The Optuna study: budget and search space, pruning a bad learning rate, failures, workers sharing one
study on SQLite and on a real PostgreSQL server, a SIGKILLed worker's trial retried, a 2-rank torchrun
worker, MLflow trial runs nested under the study run, and one real (tiny) training end to end.

Most tests use a stand-in train function (the FAKE module below, same contract as
``pix2seq.training.run_training``: hooks.on_eval on rank 0, agreed stop, a nested MLflow run) so
that many trials and processes fit in seconds; ``test_real_trials_end_to_end`` trains for real.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import tiny_train_config
from postgres_fixture import PostgresUnavailable, free_port, running_postgres, sqlalchemy_url

from pix2seq import tuning
from pix2seq.config import load_config

REPO = Path(__file__).resolve().parents[1]
GOOD_LR, BAD_LR, DIVERGE_LR, CRASH_LR, INTERRUPT_LR = 1e-3, 10.0, 20.0, 30.0, 40.0

# A stand-in for run_training: 3 evaluations, AP depending on lr and k; special learning rates
# diverge, crash or interrupt. Written to a file so worker subprocesses (and torchrun ranks) import it.
FAKE = r"""
import json, math, os, sys, time
from pathlib import Path

from pix2seq import distributed as dist
from pix2seq.engine import NonFiniteLossError
from pix2seq.tracking import RunTracker
from pix2seq.training import TrainResult

EPOCHS = 3


def final_ap(lr, k):
    return 0.0 if lr >= 1.0 else max(1.0, 60.0 - 8.0 * abs(math.log10(lr) + 3.0) - 3.0 * (k - 1))


def fake_train(cfg, hooks):
    info = dist.init_distributed()
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = Path(os.environ["FAKE_MARKER_DIR"])
    sleep = float(os.environ.get("FAKE_SLEEP", "0"))
    tracker = RunTracker(cfg, enabled=info.is_main, run_name=hooks.run_name, run_id_file=out / "mlflow_run_id",
                         parent_run_id=hooks.parent_run_id, tags=hooks.tags, log_system_metrics=False)
    run_id = tracker.start()
    (marker / f"started-{out.name}-rank{info.rank}").write_text(str(os.getpid()))
    lr, k = cfg.train.lr, cfg.train.batch_repeat
    metrics, stopped, status = {}, False, "FAILED"
    try:
        for epoch in range(1, EPOCHS + 1):
            time.sleep(sleep)
            dist.barrier()
            if lr == 20.0:
                raise NonFiniteLossError(f"non-finite loss (nan) at step {epoch}")
            if lr == 30.0:
                raise RuntimeError("boom: a crashing trial")
            if lr == 40.0:
                raise KeyboardInterrupt
            metrics = {"AP": final_ap(lr, k) * epoch / EPOCHS}
            tracker.log_metrics(metrics, step=epoch)
            stop = bool(hooks.on_eval(epoch, metrics)) if (hooks.on_eval and info.is_main) else False
            stopped = dist.agree(stop)
            with open(marker / f"rank{info.rank}.log", "a") as f:
                f.write(f"{out.name} lr={lr!r} k={k} eval={epoch} stop={int(stopped)}\n")
            if stopped:
                break
        status = "KILLED" if stopped else "FINISHED"
        return TrainResult(metrics, metrics["AP"], run_id, out, epoch, stopped)
    finally:
        tracker.end(status)


if __name__ == "__main__":  # a worker: python fake.py spec.json
    import optuna
    from pix2seq import tuning
    from pix2seq.config import load_config

    spec = json.loads(Path(sys.argv[1]).read_text())
    cfg = load_config(None, spec["overrides"])
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0) if spec.get("median1") else None
    summary = tuning.run_study(cfg, train_fn=fake_train, pruner=pruner, runs_dir=spec["runs_dir"],
                               grace_period_s=spec.get("grace"), max_retry=1, write_output=False, plots=False,
                               poll_s=0.5)
    if summary is not None:
        (Path(os.environ["FAKE_MARKER_DIR"]) / f"summary-{os.getpid()}.json").write_text(
            json.dumps({"ran": summary.trials_run_here, "counts": summary.counts, "parent": summary.parent_run_id}))
    dist.cleanup()
"""


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The FAKE module, imported in-process, its marker dir in tmp_path."""
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE)
    marker = tmp_path / "markers"
    marker.mkdir()
    monkeypatch.setenv("FAKE_MARKER_DIR", str(marker))
    monkeypatch.setenv("FAKE_SLEEP", "0")
    spec = importlib.util.spec_from_file_location("fake_worker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.path, mod.marker = path, marker
    return mod


def _tune_overrides(tmp: Path, storage: str, n_trials: int, **over) -> list[str]:
    base = {
        "tune.study_name": "s",
        "tune.storage": storage,
        "tune.n_trials": n_trials,
        "tune.heartbeat_s": 1,
        "tune.lr_min": 1e-4,
        "tune.lr_max": 40.0,
        "tune.output": str(tmp / "best_params.json"),
        "tune.report_dir": str(tmp / "reports"),
        "tracking.experiment": "tune-test",
        "tracking.log_system_metrics": False,
        "tracking.register": False,
    }
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _env(mlflow_uri: str, marker: Path, sleep: float = 0.0) -> dict[str, str]:
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow_uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
        FAKE_MARKER_DIR=str(marker),
        FAKE_SLEEP=str(sleep),
        OMP_NUM_THREADS="1",
    )
    env["PYTHONPATH"] = str(REPO / "src")
    env.pop("GPUS", None)
    return env


def _spawn(
    fake,
    tmp: Path,
    name: str,
    overrides: list[str],
    mlflow_uri: str,
    sleep: float = 0.0,
    env: dict[str, str] | None = None,
    **spec,
) -> subprocess.Popen:
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps({"overrides": overrides, "runs_dir": str(tmp / "runs"), **spec}))
    cmd = [sys.executable, str(fake.path), str(spec_path)]
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd,
        cwd=tmp,
        env={**_env(mlflow_uri, fake.marker, sleep), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait(procs: list[subprocess.Popen], tmp: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p in procs:
        name = Path(p.args[-1]).stem
        assert p.returncode == 0, (tmp / f"{name}.log").read_text()[-4000:]


def _study(storage: str) -> optuna.Study:
    """The storage's one study (``s-<digest>``: the test configs' tune.study_name is "s")."""
    (name,) = optuna.get_all_study_names(storage)
    assert name.startswith("s-"), name
    return optuna.load_study(study_name=name, storage=storage)


def _states(study: optuna.Study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def _child_runs(mlflow_uri: str, parent: str, experiment: str = "tune-test") -> dict[int, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    out = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    assert len(out) == len(runs), "one run per trial"
    return out


def _study_runs(mlflow_uri: str, experiment: str = "tune-test") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`optuna.role` = 'study'")


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, created once (its schema migrations take seconds) and copied per test."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    import mlflow

    mlflow.set_tracking_uri(None)
    return db


def _mlflow_sqlite(template: Path, tmp: Path) -> str:
    shutil.copy(template, tmp / "mlflow.db")
    return f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.fixture
def mlflow_copy(mlflow_template, tmp_path, monkeypatch):
    """This process tracks to a private copy of the template store."""
    uri = _mlflow_sqlite(mlflow_template, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    import mlflow

    mlflow.set_tracking_uri(None)


def _init_mlflow(uri: str, tmp: Path) -> None:
    """Create the store's schema and the experiment (artifacts in tmp) before workers race to do it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name("tune-test") is None:
        client.create_experiment("tune-test", artifact_location=(tmp / "mlruns").as_uri())


# -------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A throwaway PostgreSQL server on 127.0.0.1 (tests/postgres_fixture.py) with databases ``optuna``
    and ``mlflow`` (both use an ``alembic_version`` table, so they cannot share one); its server URL."""
    try:
        cm = running_postgres(tmp_path_factory.mktemp("postgres"), dbname="optuna")
        dsn = cm.__enter__()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    try:
        import psycopg2

        server = dsn.rsplit("/", 1)[0]
        conn = psycopg2.connect(f"{server}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute('CREATE DATABASE "mlflow"')
        conn.close()
        yield server
    finally:
        cm.__exit__(None, None, None)


# ------------------------------------------------------------------------------------ tests


def test_trial_config_budget_and_search_space(tmp_path):
    cfg = load_config(None, ["tune.trial_minutes=2", "train.eval_every_minutes=0", "train.epochs=300"])
    t = tuning.trial_config(cfg, {"train.lr": 2e-3, "train.batch_repeat": 3}, tmp_path / "t0")
    assert (t.train.lr, t.train.batch_repeat, t.train.max_minutes, t.train.epochs) == (2e-3, 3, 2.0, 300)
    assert (
        t.train.eval_every_minutes == 0.5
        and t.train.resume == "never"
        and t.train.output_dir == str(tmp_path / "t0")
    )
    cfg = load_config(None, ["tune.trial_epochs=8", "train.max_minutes=5", "train.eval_every_epochs=10"])
    t = tuning.trial_config(cfg, {"train.lr": 1e-4, "train.batch_repeat": 1}, tmp_path / "t1")
    assert (t.train.epochs, t.train.max_minutes, t.train.eval_every_epochs) == (8, 0.0, 2)
    assert tuning.trial_output_dir("runs/tune", "my study/1", 7) == Path("runs/tune/my_study_1/trial-7")

    cfg = load_config(
        None, ["tune.lr_min=1e-4", "tune.lr_max=3e-3", "tune.repeat_min=1", "tune.repeat_max=3"]
    )
    tcfg = cfg.tune
    study = optuna.create_study(direction="maximize", sampler=tuning.make_sampler(cfg)[0])
    for _ in range(12):
        p = tuning.suggest_params(study.ask(), tcfg)
        assert 1e-4 <= p["train.lr"] <= 3e-3 and p["train.batch_repeat"] in (1, 2, 3)
    d = study.trials[0].distributions
    assert d["train.lr"].log and isinstance(d["train.batch_repeat"], optuna.distributions.IntDistribution)

    def draws(seed: int) -> list[float]:
        s = optuna.create_study(sampler=tuning.TrialSeededSampler(seed=seed, n_startup_trials=10))
        return [s.ask().suggest_float("x", 0, 1) for _ in range(3)]

    assert draws(0) == draws(0) != draws(1)  # seeded; trial n draws from seed + n (workers differ)
    assert len(set(draws(0))) == 3


def test_bad_lr_pruned_and_failures_recorded(fake, tmp_path, mlflow_copy):
    """A good trial completes; LR 10 reports AP 0 at its first evaluation and the median pruner stops it;
    a NaN loss is PRUNED (diverged), a crash is FAIL and the study goes on; Ctrl-C stops the study."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = load_config(None, _tune_overrides(tmp_path, storage, n_trials=4))
    study, _ = tuning.open_study(tuning.study_name(cfg), storage)
    for lr in (GOOD_LR, BAD_LR, DIVERGE_LR, CRASH_LR, GOOD_LR):
        study.enqueue_trial({"train.lr": lr, "train.batch_repeat": 1})
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    summary = tuning.run_study(cfg, train_fn=fake.fake_train, pruner=pruner, runs_dir=tmp_path / "runs")

    study = _study(storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED", "FAIL", "COMPLETE"]
    assert trials[0].value == pytest.approx(60.0)
    assert trials[0].intermediate_values == {1: 20.0, 2: 40.0, 3: 60.0}
    assert trials[1].intermediate_values == {1: 0.0}  # pruned at its first evaluation ...
    log = (fake.marker / "rank0.log").read_text().splitlines()
    # ... and its training stopped there
    assert [ln for ln in log if "trial-1" in ln] == ["trial-1 lr=10.0 k=1 eval=1 stop=1"]
    assert "diverged" in trials[2].user_attrs and trials[2].intermediate_values == {}
    # the FAIL does not count toward n_trials
    assert summary.counts["COMPLETE"] + summary.counts["PRUNED"] == 4
    assert summary.best["trial"] in (0, 4) and summary.best["train.lr"] == GOOD_LR
    assert json.loads((tmp_path / "best_params.json").read_text()) == summary.best
    assert set(summary.best) == {
        "train.lr", "train.batch_repeat", "AP", "trial", "study", "config_digest", "recommended", "verdict"
    }  # fmt: skip
    assert summary.best["recommended"] and summary.report["best_trial"] == summary.best["trial"]
    report = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert [t["state"] for t in report["trials"]] == ["COMPLETE", "PRUNED", "PRUNED", "FAIL", "COMPLETE"]
    assert report["trials"][1]["note"] == "pruned after evaluation 1" and report["trials"][1]["ap"] == 0.0
    assert report["trials"][2]["note"] == "diverged (NaN loss)"
    assert report["trials"][0]["steps"] == 3  # the fake trains 3 "steps"
    for n in range(5):  # every trial its own folder
        assert (tmp_path / "runs" / tuning.study_name(cfg) / f"trial-{n}").is_dir()

    runs = _child_runs(mlflow_copy, summary.parent_run_id)
    assert {n: r.data.tags["optuna.trial_state"] for n, r in runs.items()} == _states(study)
    assert runs[1].info.status == "KILLED" and runs[3].info.status == "FAILED"
    assert "boom" in runs[3].data.tags["optuna.fail_reason"] and "optuna.diverged" in runs[2].data.tags
    assert runs[1].data.params["train.lr"] == "10.0" and runs[1].data.params["train.batch_repeat"] == "1"

    study.enqueue_trial({"train.lr": INTERRUPT_LR, "train.batch_repeat": 1})
    cfg = load_config(None, _tune_overrides(tmp_path, storage, n_trials=6))
    with pytest.raises(KeyboardInterrupt):  # not swallowed like other exceptions
        tuning.run_study(cfg, train_fn=fake.fake_train, pruner=pruner, runs_dir=tmp_path / "runs")
    assert _states(_study(storage))[5] == "FAIL"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(backend, fake, tmp_path, request, mlflow_template):
    if backend == "sqlite":
        storage, mlflow_uri = f"sqlite:///{tmp_path / 'optuna.db'}", _mlflow_sqlite(mlflow_template, tmp_path)
    else:  # both the study and MLflow on the server, as workers on several machines would share them
        url = request.getfixturevalue("postgres_url")
        storage = tuning.storage_url(f"{url}/optuna")
        mlflow_uri = sqlalchemy_url(f"{url}/mlflow")
    _init_mlflow(mlflow_uri, tmp_path)
    n = 6
    # heartbeats every 30 s: on a loaded machine a worker can stall past the 2 s grace of
    # heartbeat_s 1, and the other would fail its trial as lost (that path has its own test)
    over = _tune_overrides(tmp_path, storage, n_trials=n, **{"tune.lr_max": 3e-3, "tune.heartbeat_s": 30})
    procs = [_spawn(fake, tmp_path, f"worker{i}", over, mlflow_uri, sleep=0.4) for i in range(2)]
    _wait(procs, tmp_path)

    study = _study(storage)
    states = _states(study)
    assert len(states) == n and set(states.values()) <= {"COMPLETE", "PRUNED"}, states  # all accounted for
    summaries = [json.loads(p.read_text()) for p in fake.marker.glob("summary-*.json")]
    assert len(summaries) == 2 and all(s["ran"] for s in summaries), summaries  # both workers worked
    assert sorted(sum((s["ran"] for s in summaries), [])) == list(range(n))  # each trial run once
    assert len({s["parent"] for s in summaries}) == 1  # one MLflow study run
    assert len({t.params["train.lr"] for t in study.trials}) == n  # no duplicate proposals across workers

    parents = _study_runs(mlflow_uri)
    assert [r.info.run_id for r in parents] == [summaries[0]["parent"]]
    runs = _child_runs(mlflow_uri, parents[0].info.run_id)
    assert {k: r.data.tags["optuna.trial_state"] for k, r in runs.items()} == states
    for k, r in runs.items():
        assert float(r.data.params["train.lr"]) == pytest.approx(study.trials[k].params["train.lr"])


@pytest.mark.slow
def test_killed_worker_trial_is_retried(fake, tmp_path, mlflow_copy):
    """SIGKILL a worker mid-trial; the next worker (here: this process) fails the silent trial and retries it."""
    storage, mlflow_uri = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_copy
    _init_mlflow(mlflow_uri, tmp_path)
    over = _tune_overrides(tmp_path, storage, n_trials=1, **{"tune.lr_max": 3e-3})
    slow = _spawn(fake, tmp_path, "slow", over, mlflow_uri, sleep=120.0, grace=2)
    deadline = time.monotonic() + 120
    while not (fake.marker / "started-trial-0-rank0").exists():
        assert slow.poll() is None, (tmp_path / "slow.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first worker never started its trial"
        time.sleep(0.2)
    os.kill(slow.pid, signal.SIGKILL)  # mid-trial: no chance to record anything
    slow.wait(timeout=30)
    assert _states(_study(storage)) == {0: "RUNNING"}

    summary = tuning.run_study(
        load_config(None, over),
        train_fn=fake.fake_train,
        runs_dir=tmp_path / "runs",
        grace_period_s=2,
        max_retry=1,
        write_output=False,
        poll_s=0.5,
    )
    assert summary.trials_run_here == [1]
    study = _study(storage)
    t0, t1 = study.trials
    assert (t0.state.name, t1.state.name) == ("FAIL", "COMPLETE")
    assert t1.params == t0.params and t1.system_attrs["failed_trial"] == 0
    runs = _child_runs(mlflow_uri, study.user_attrs[tuning.PARENT_RUN_ATTR])
    assert runs[0].data.tags["optuna.trial_state"] == "FAIL" and runs[0].info.status == "FAILED"
    assert (
        runs[1].data.tags["optuna.trial_state"] == "COMPLETE" and runs[1].data.tags["optuna.retry_of"] == "0"
    )


@pytest.mark.slow
def test_torchrun_worker_ranks_in_lockstep(fake, tmp_path, mlflow_template):
    """A 2-rank (gloo) worker as torchrun starts it: both ranks train the same trials in lockstep, and
    rank 0's pruning decision reaches rank 1."""
    storage, mlflow_uri = f"sqlite:///{tmp_path / 'optuna.db'}", _mlflow_sqlite(mlflow_template, tmp_path)
    _init_mlflow(mlflow_uri, tmp_path)
    over = _tune_overrides(tmp_path, storage, n_trials=3, **{"tune.lr_max": 10.0})
    study, _ = tuning.open_study(tuning.study_name(load_config(None, over)), storage)
    for lr in (GOOD_LR, BAD_LR):
        study.enqueue_trial({"train.lr": lr, "train.batch_repeat": 2})
    port = str(free_port())  # the environment torchrun gives its ranks (launched directly: one import less)
    ranks = [
        _spawn(
            fake,
            tmp_path,
            f"rank{r}",
            over,
            mlflow_uri,
            median1=True,
            env={
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(2)
    ]
    _wait(ranks, tmp_path)
    r0 = (fake.marker / "rank0.log").read_text().splitlines()
    r1 = (fake.marker / "rank1.log").read_text().splitlines()
    assert r0 == r1
    assert "trial-1 lr=10.0 k=2 eval=1 stop=1" in r1
    assert not any("trial-1 lr=10.0 k=2 eval=2" in x for x in r1)
    states = _states(_study(storage))
    assert states[0] == "COMPLETE" and states[1] == "PRUNED" and len(states) == 3
    assert len([ln for ln in r1 if ln.startswith("trial-2")]) >= 1  # a third, sampled trial on both ranks


def test_study_is_tied_to_its_configuration(tmp_path, mlflow_copy, fake):
    """The study's name carries a digest of what a trial trains: the tuned keys, the trial folders, the
    study's bookkeeping and runtime keys leave it alone, anything a trial reads changes it;
    `--best-overrides` (make train-best) reads the current configuration's study only."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = _tune_overrides(tmp_path, storage, n_trials=1, **{"tune.lr_max": 3e-3})
    name = tuning.study_name(load_config(None, base))
    assert name.startswith("s-") and len(name) == len("s-") + 8
    for same in ("train.lr=0.1", "train.batch_repeat=3", "train.output_dir=x", "tune.n_trials=50",
                 "tune.storage=sqlite:///other.db", "tracking.experiment=x", "data.num_workers=7",
                 "eval.num_vis=3"):  # fmt: skip
        assert tuning.study_name(load_config(None, [*base, same])) == name, same
    for other in (
        "model.d_model=64",
        "data.image_size=128",
        "tokenizer.bins=64",
        "seed=1",
        "eval.decoding=beam",
        "tune.lr_max=0.01",
        "tune.trial_minutes=2",
        "train.max_minutes=1",
    ):  # fmt: skip  (no tune.trial_* budget: the train section is it)
        assert tuning.study_name(load_config(None, [*base, other])) != name, other

    cfg = load_config(None, base)
    with pytest.raises(tuning.StudyError, match=f"no study {name} in .*run `make tune` first"):
        tuning.best_overrides(cfg)
    tuning.run_study(cfg, train_fn=fake.fake_train, runs_dir=tmp_path / "runs", plots=False)
    (trial,) = _study(storage).trials
    assert tuning.best_overrides(cfg) == [
        f"train.lr={trial.params['train.lr']!r}",
        f"train.batch_repeat={trial.params['train.batch_repeat']}",
    ]
    changed = load_config(None, [*base, "model.d_model=64"])  # model params changed since the study ran
    with pytest.raises(tuning.StudyError, match="the configuration changed since the last tuning"):
        tuning.best_overrides(changed)


def test_pruner_waits_for_the_click():
    """Neither pruner stops a trial in the first tune.pruner_warmup of its evaluations."""
    cfg = load_config(None, ["tune.trial_minutes=2", "tune.n_trials=8", "train.eval_every_minutes=0.5"])
    pruner, desc = tuning.make_pruner(cfg)  # 4 evaluations a trial, warm-up 0.5: the 3rd may prune
    assert "n_warmup_steps=3" in desc and "4 evaluations" in desc
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(2):  # two good finished trials
        t = study.ask()
        for step in range(1, 5):
            t.report(50.0 * step, step)
        study.tell(t, 200.0)
    late = study.ask()  # a trial whose classes click late: AP 0 at evaluations 1 and 2
    for step in (1, 2):
        late.report(0.0, step)
        assert not late.should_prune(), step
    late.report(0.0, 3)
    assert late.should_prune()  # still nothing after the warm-up: pruned
    cfg = load_config(None, ["tune.trial_minutes=2", "train.eval_every_minutes=0.5", "tune.pruner_warmup=0"])
    assert "n_warmup_steps=1" in tuning.make_pruner(cfg)[1]
    cfg = load_config(None, ["tune.trial_minutes=2", "train.eval_every_minutes=0.5", "tune.pruner=hyperband"])
    assert "min_resource=3" in tuning.make_pruner(cfg)[1]


@pytest.mark.slow
def test_real_trials_end_to_end(tiny_prepared, tmp_path, mlflow_copy, monkeypatch, capsys):
    """`pix2seq tune` with run_training: 2 tiny trials, best_params.json, MLflow nesting and plots,
    then `pix2seq tune --best-overrides` for `make train-best`."""
    from pix2seq.cli import main

    root, prepared = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    over = tiny_train_config(root, prepared, tmp_path / "unused", **{"train.epochs": 2}) + _tune_overrides(
        tmp_path, storage, n_trials=2, **{"tune.lr_max": 3e-3, "tune.trial_epochs": 2, "tune.pruner": "none"}
    )
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--params", str(params), "--runs-dir", str(tmp_path / "runs"), *over]) == 0

    study = _study(storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    best = json.loads((tmp_path / "best_params.json").read_text())
    assert best["trial"] in (0, 1) and best["study"] == study.study_name and math.isfinite(best["AP"])
    for t in study.trials:  # the objective is the trial's final AP; two evaluations were reported
        summary = json.loads(
            (tmp_path / "runs" / study.study_name / f"trial-{t.number}" / "train_summary.json").read_text()
        )
        assert t.value == pytest.approx(max(summary["final_AP"], 0.0))
        assert sorted(t.intermediate_values) == [1, 2]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_copy)
    (parent,) = _study_runs(mlflow_copy)
    assert parent.info.run_name == f"study-{study.study_name}"
    runs = _child_runs(mlflow_copy, parent.info.run_id)
    assert sorted(runs) == [0, 1]
    for n, r in runs.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
        assert (
            r.data.tags["optuna.trial_state"] == "COMPLETE"
            and r.info.run_name == f"{study.study_name}-trial-{n}"
        )
        assert float(r.data.params["train.lr"]) == pytest.approx(study.trials[n].params["train.lr"])
        assert r.data.params["train.batch_repeat"] == str(study.trials[n].params["train.batch_repeat"])
        assert r.data.params["train.output_dir"] == str(tmp_path / "runs" / study.study_name / f"trial-{n}")
        assert len(client.get_metric_history(r.info.run_id, "val/AP")) == 2  # one per evaluation
    p = client.get_run(parent.info.run_id)
    assert p.info.status == "FINISHED" and p.data.metrics["study/best_AP"] == pytest.approx(best["AP"])
    assert p.data.tags["best.trial"] == str(best["trial"]) and "search_space" in p.data.params
    assert p.data.params["config_digest"] == study.study_name.rsplit("-", 1)[1]
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"optimization_history.png", "parallel_coordinate.png"} <= plots
    assert "best_params.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert not client.search_registered_models()  # trials register no model

    # a finished study resumes as finished: no new trial
    assert main(["tune", "--params", str(params), "--runs-dir", str(tmp_path / "runs"), *over]) == 0
    assert len(_study(storage).trials) == 2

    out = capsys.readouterr().out
    # 2 epochs of a tiny model learn nothing measurable: the study says so and recommends nothing
    assert "no recommendation: no trial learned measurably" in out
    report = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert report["recommended"] is False and not best["recommended"]
    assert [t["steps"] for t in report["trials"]] == [t.user_attrs["steps"] for t in study.trials]
    for name in ("summary.json", "trials.csv", "optimization_history.png", "parallel_coordinate.png"):
        assert (tmp_path / "reports" / name).is_file()
    proc = subprocess.run(  # what `make train-best` runs: it refuses parameters nothing was learnt with
        [str(REPO / "bin" / "pix2seq"), "tune", "--params", str(params), "--best-overrides", *over],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "recommends nothing" in proc.stderr


def _study_with(results: list[tuple[str, float, float | None, list[float]]]) -> optuna.Study:
    """An in-memory study of finished trials: (state, lr, final AP, intermediate APs)."""
    dist_lr = optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)
    dist_k = optuna.distributions.IntDistribution(1, 3)
    study = optuna.create_study(direction="maximize", study_name="report")
    for state, lr, ap, evals in results:
        study.add_trial(
            optuna.trial.create_trial(
                state=getattr(optuna.trial.TrialState, state),
                value=ap,
                params={"train.lr": lr, "train.batch_repeat": 1},
                distributions={"train.lr": dist_lr, "train.batch_repeat": dist_k},
                intermediate_values=dict(enumerate(evals, 1)),
                user_attrs={"train_minutes": 0.5, "steps": 120},
            )
        )
    return study


def test_report_recommends_only_what_trials_learned(tmp_path):
    """Trials that never left the plateau (every AP < 1) recommend nothing and say why; trials that
    learned rank their parameters; pruned trials count with their last AP; the PNGs are real images."""
    from PIL import Image

    from pix2seq.tuning.report import format_report, study_report, write_report

    plateau = _study_with([("COMPLETE", 1e-3, 0.1, [0.0, 0.1]), ("COMPLETE", 1e-2, 0.0, [0.0, 0.0])])
    report = study_report(plateau, "for 0.5 min", "random weights")
    assert report["recommended"] is False and "recommends nothing" in report["verdict"]
    assert "no recommendation: no trial learned measurably (best AP 0.1)" in format_report(report)
    assert "tune.init_from" in report["verdict"]  # the advice: start trials from a trained model
    fine_tuned = study_report(plateau, "for 0.5 min", "runs/train/model.pt", from_model=True)
    assert fine_tuned["verdict"].endswith("(give trials more time, tune.trial_minutes)")

    learned = _study_with([
        ("COMPLETE", 1e-3, 62.0, [30.0, 62.0]),
        ("PRUNED", 2e-2, None, [3.0]),
        ("COMPLETE", 3e-4, 55.0, [20.0, 55.0]),
    ])  # fmt: skip
    report = study_report(learned, "for 0.5 min", "runs/train/model.pt")
    assert report["recommended"] and report["best_trial"] == 0
    assert report["verdict"] == "trial 0 is best (AP 62.0), 59.0 AP above the worst (trial 1, pruned)"
    text = format_report(report)
    assert "each trained for 0.5 min from runs/train/model.pt" in text
    assert "0.50 min, 120 steps" in text and "(pruned after evaluation 1)" in text

    files = write_report(learned, report, tmp_path / "tune")
    names = {f.name for f in files}
    assert {"summary.json", "trials.csv", "optimization_history.png", "parallel_coordinate.png"} <= names
    for f in files:
        if f.suffix == ".png":
            with Image.open(f) as im:
                assert im.format == "PNG" and min(im.size) > 200
    assert json.loads((tmp_path / "tune" / "summary.json").read_text()) == report
    stale = tmp_path / "tune" / "param_importances.png"
    write_report(plateau, study_report(plateau, "x", "y"), tmp_path / "tune", plots=False)
    assert not stale.exists()  # no plot of an earlier study is left beside this one's summary


def test_qmc_sampler_spreads_a_small_study():
    """tune.sampler: qmc draws scrambled Sobol points: reproducible for a seed, and the first trials of
    a small study fall in different quarters of the (log) learning-rate range."""
    cfg = load_config(None, ["tune.sampler=qmc", "tune.lr_min=1e-4", "tune.lr_max=1e-2", "tune.n_trials=4"])

    def draws(seed: int) -> list[float]:
        sampler, desc = tuning.make_sampler(load_config(None, [*cfg_over, f"tune.sampler_seed={seed}"]))
        assert desc.startswith("QMC(sobol")
        study = optuna.create_study(sampler=sampler, direction="maximize")
        out = []
        for _ in range(4):
            t = study.ask()
            out.append(tuning.suggest_params(t, cfg.tune)["train.lr"])
            study.tell(t, 0.0)
        return out

    cfg_over = ["tune.sampler=qmc", "tune.lr_min=1e-4", "tune.lr_max=1e-2"]
    a = draws(0)
    assert a == draws(0) != draws(1)
    quarters = {int((math.log10(lr) + 4) / 2 * 4) for lr in a}  # log10 range -4..-2 in quarters
    assert quarters == {0, 1, 2, 3}


def test_trials_fine_tune_from_tune_init_from(tmp_path):
    """tune.init_from becomes every trial's model.init_from, and the study is tied to the file's
    content: a retrained model (same path) starts a new study instead of resuming the old one."""
    from pix2seq.tuning.study import trial_start

    model = tmp_path / "model.pt"
    model.write_bytes(b"weights of the first training")
    cfg = load_config(None, [f"tune.init_from={model}", "tune.lr_max=1e-2"])
    tcfg = tuning.trial_config(cfg, {"train.lr": 1e-3, "train.batch_repeat": 1}, tmp_path / "trial")
    assert (
        tcfg.model.init_from == str(model) and cfg.model.init_from == ""
    )  # the train stage's own is untouched
    assert trial_start(cfg) == str(model)
    assert trial_start(load_config(None, [])) == "random weights"
    name = tuning.study_name(cfg)
    assert tuning.study_name(load_config(None, [f"tune.init_from={model}", "tune.lr_max=1e-2"])) == name
    model.write_bytes(b"weights of a second training")
    assert tuning.study_name(cfg) != name
    assert tuning.study_name(load_config(None, ["tune.lr_max=1e-2"])) != name


def test_a_missing_model_to_fine_tune_fails_before_any_trial(tmp_path):
    """tune.init_from naming no file is one StudyError naming the key, before a study or trial exists."""
    db = tmp_path / "optuna.db"
    cfg = load_config(None, [f"tune.init_from={tmp_path / 'none.pt'}", f"tune.storage=sqlite:///{db}"])

    def train(*_):
        raise AssertionError("no trial may run")

    with pytest.raises(tuning.StudyError, match=r"^tune.init_from: .*none.pt: no such file"):
        tuning.run_study(cfg, train_fn=train, runs_dir=tmp_path / "runs")
    assert not db.exists()
