"""The Optuna search (hparams_search=optuna): slots that never wait for each other, dead trials retried through
the heartbeat, two sweepers on one study in a real PostgreSQL server, pruning, the report."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from charlm.symbols import kind
from conftest import FAST, ROOT, compose_config, run_train, write_tiny_ptb

# A small space over a tiny model; the command line's sweeps replace hparams_search/optuna.yaml's entries
SPACE = ("model.hidden_size=choice(16,24)", "data.seq_len=choice(5,10)", "optimizer.weight_decay=0.01",
         "model.dropout=0", "optimizer.lr=tag(log,interval(0.002,0.02))")
TINY = ("data.batch_size=4", "data.eval_batch_size=2", "trainer.precision=32-true", *FAST)
BEAT = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")  # a dead trial found in seconds


def trials(db) -> list:
    return optuna.load_study(study_name=db.parent.name, storage=f"sqlite:///{db}").get_trials()


def retried(trial) -> int | None:
    """The number of the trial that `trial` retries, as Optuna's retry callback records it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def trial_dir(sweep, number: int):
    """The job directory of the trial `number` once Hydra has written its overrides, else None."""
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        if f"- trial={number}\n" in overrides.read_text():
            return overrides.parent.parent
    return None


def test_a_trial_whose_sweeper_was_killed_is_retried_by_the_next_sweeper_through_its_heartbeat(tmp_path):
    data = write_tiny_ptb(tmp_path / "ptb", repeat=600)  # ~900 windows an epoch: time to kill mid-trial
    sweep = tmp_path / "search"
    command = ["-m", "hparams_search=optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", *BEAT,
               "trainer.max_epochs=1", "trainer.limit_train_batches=300", "sweep.every_n_train_steps=50", *SPACE, *TINY]
    env = dict(os.environ, CHARLM_DATA_DIR=str(data), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((job := trial_dir(sweep, 1)) and (job / "checkpoints" / "last.ckpt").exists()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the sweeper and its running trial, as a lost node or `kill -9` would
    proc.wait()
    proc.stderr.close()
    before = trials(sweep / "optuna.db")
    assert [t.state for t in before] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    time.sleep(3)  # the grace period: its heartbeats have stopped for that long

    # the same command, as another node's sweeper of the study: it fails the trial and asks its values first
    again = run_train(*command, data_dir=data, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    after = trials(sweep / "optuna.db")
    assert len(after) == 4  # the two of the killed launch, and the two this one added
    assert after[1].state == optuna.trial.TrialState.FAIL  # its heartbeat stopped: marked failed
    assert retried(after[2]) == 1
    assert after[2].params == before[1].params  # asked again with its values, its job resumed from last.ckpt
    assert "resuming the interrupted job" in (sweep / after[2].user_attrs["dir"].split("/")[-1] / "train.log").read_text()
    assert [t.state for t in after[2:]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert after[0].value == before[0].value  # the completed trial was not run again
    assert len(list(sweep.glob("*/.hydra"))) == 3  # three distinct jobs: trials 1 and 2 share theirs

    search = json.loads((sweep / "search.json").read_text())
    assert [t["retry_of"] for t in search["trials"]] == [None, None, 1, None]
    best = min((t for t in after if t.value is not None), key=lambda t: t.value)
    assert search["best"]["number"] == best.number and search["best"]["value"] == best.value
    summary = (sweep / "summary.md").read_text()
    assert f"Best: trial {best.number}" in summary and "completed, best" in summary
    assert search["best"]["command"].startswith("python train.py ") and "hparams_search" not in search["best"]["command"]
    assert f"optimizer.lr={best.params['optimizer.lr']:.4g}" in search["best"]["command"]


def test_trials_run_side_by_side_on_the_parallel_launcher(tiny_data, tmp_path):
    sweep = tmp_path / "search"
    result = run_train("-m", "hparams_search=optuna", "hydra/launcher=parallel", f"hydra.sweep.dir={sweep}",
                       "hydra.sweeper.n_trials=2", "debug=smoke", *SPACE, *TINY, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 at a time" in result.stdout + result.stderr
    done = trials(sweep / "optuna.db")
    assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] * 2
    devices = {json.loads((sweep / t.user_attrs["dir"].split("/")[-1] / "device.json").read_text())["device"]
               for t in done}
    assert len(devices) == 2  # one device slot per trial


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's programs (Debian's /usr/lib/postgresql/<version>/bin)."""
    found = [b for b in Path("/usr/lib/postgresql").glob("*/bin") if (b / "postgres").is_file() and b.parent.name.isdigit()]
    return max(found, key=lambda b: int(b.parent.name)) if found else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this module's own on 127.0.0.1 at a free port (trust auth), with a database
    `optuna`; its URL. Skipped where the server or the driver is missing, failed so in CI."""
    bindir, missing = postgres_bin(), None
    if bindir is None:
        missing = "PostgreSQL's server is not installed (Debian: apt-get install postgresql)"
    elif os.geteuid() == 0 and not shutil.which("runuser"):
        missing = "runuser is missing: PostgreSQL's server refuses to run as root"
    try:
        import psycopg
    except ImportError:
        missing = missing or "the PostgreSQL driver is not installed: pip install -e '.[postgres]'"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI runs this test (.ci/run installs the server)")
        pytest.skip(missing)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # the server refuses root
    home = Path(tempfile.mkdtemp(prefix="charlm-postgres-"))
    if as_user:
        shutil.chown(home, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(program: str, *args: str) -> None:
        subprocess.run([*as_user, str(bindir / program), *args], check=True, capture_output=True, timeout=120)

    data = str(home / "data")
    run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    # no fsync, a socket directory of its own: a throwaway server
    run("pg_ctl", "-D", data, "-l", str(home / "server.log"), "-o", f"-h 127.0.0.1 -p {port} -k {home} -F", "-w", "start")
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


def test_two_sweepers_share_one_study_in_a_postgresql_server(postgres, tiny_data, tmp_path):
    sweep = tmp_path / "search"  # one directory for both, as a shared file system gives every node
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna", f"hydra.sweep.dir={sweep}",
               f"hydra.sweeper.storage={postgres}", "hydra.sweeper.study_name=shared", "hydra.sweeper.n_trials=3",
               "hydra.sweeper.pruner.n_startup_trials=10", "debug=smoke", *SPACE, *TINY]  # none pruned: all complete
    env = dict(os.environ, CHARLM_DATA_DIR=str(tiny_data), PYTHONUNBUFFERED="1")
    sweepers = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    for sweeper in sweepers:
        _, stderr = sweeper.communicate(timeout=300)
        assert sweeper.returncode == 0, stderr[-3000:]

    done = optuna.load_study(study_name="shared", storage=postgres).trials
    assert [t.number for t in done] == list(range(6))  # none lost
    assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] * 6
    runs = {}
    for t in done:
        runs.setdefault(t.user_attrs["sweeper"], []).append((t.datetime_start, t.datetime_complete))
    assert sorted(len(r) for r in runs.values()) == [3, 3]
    first, second = runs.values()
    assert max(s for s, _ in first) < max(e for _, e in second) and max(s for s, _ in second) < max(e for _, e in first)
    # a job directory each, whose job ran once: no trial ran twice
    dirs = [sweep / Path(t.user_attrs["dir"]).name for t in done]
    assert len(set(dirs)) == 6 and len(list(sweep.glob("*/.hydra"))) == 6
    for t, job in zip(done, dirs):
        assert f"- trial={t.number}\n" in (job / ".hydra" / "overrides.yaml").read_text()
        log = (job / "train.log").read_text()  # a second run there would have kept, resumed or set aside the first
        assert "kept as it is" not in log and "resuming" not in log and not (job / "attempts").exists()
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"

    search = json.loads((sweep / "search.json").read_text())
    assert [(t["number"], t["state"]) for t in search["trials"]] == [(n, "complete") for n in range(6)]
    summary = (sweep / "summary.md").read_text()
    assert "6 trials (6 complete)" in summary and "6 jobs: 6 completed" in summary


class StandInLauncher:
    """A launcher that runs no job: each trial takes `hold(number)` (which may wait on the test), and its
    value is its lr; it records how many trials the study had completed when each one was launched."""

    def __init__(self, url: str, hold) -> None:
        self.url, self.hold, self.completed_at_launch = url, hold, {}

    def launch(self, job_overrides, initial_job_idx: int):
        from hydra.core.utils import JobStatus

        (overrides,) = job_overrides
        study = optuna.load_study(study_name="s", storage=self.url)
        self.completed_at_launch[initial_job_idx] = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        self.hold(initial_job_idx)
        lr = float(next(o for o in overrides if o.startswith("optimizer.lr=")).split("=", 1)[1])
        return [SimpleNamespace(hydra_cfg=None, status=JobStatus.COMPLETED, return_value=lr)]


def stand_in_search(tmp_path, hold, n_trials: int, n_jobs: int):
    from omegaconf import OmegaConf

    from charlm.search import OptunaSearch

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = OmegaConf.create({
        "storage": url, "study_name": "s", "direction": "minimize", "n_trials": n_trials, "n_jobs": n_jobs, "seed": 1,
        "heartbeat_interval": 1, "grace_period": 3, "max_retry": 3, "params": {"optimizer.lr": "interval(0.001,0.1)"},
        "sampler": {"_target_": "optuna.samplers.TPESampler", "n_startup_trials": 2, "constant_liar": True},
        "pruner": {"_target_": "optuna.pruners.NopPruner"}})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    launcher = StandInLauncher(url, hold)
    return OptunaSearch(config, launcher, SimpleNamespace(config_loader=None), settings), launcher, url


def test_a_slot_takes_the_next_trial_as_its_own_ends_without_waiting_for_the_others(tmp_path):
    others_done = threading.Event()

    def hold(number: int) -> None:
        if number == 0:  # a long trial: it ends only once the other slot has run four trials after its first
            assert others_done.wait(timeout=60), "the other slot waited for this trial: a batch barrier"
        elif number == 4:
            others_done.set()

    search, launcher, url = stand_in_search(tmp_path, hold, n_trials=5, n_jobs=2)
    returns = search.sweep([], validate=lambda batch: None)
    assert len(returns) == 5
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    # each trial was asked once the one before it on its slot had been told: the sampler saw every result
    assert [launcher.completed_at_launch[n] for n in range(5)] == [0, 0, 1, 2, 3]
    assert len(json.loads((tmp_path / "sweep" / "search.json").read_text())["trials"]) == 5


def test_a_trial_whose_job_the_launcher_lost_is_failed_and_asked_again(tmp_path):
    def hold(number: int) -> None:
        if number == 0:
            raise RuntimeError("the job's worker was killed")

    search, _, url = stand_in_search(tmp_path, hold, n_trials=3, n_jobs=1)
    with pytest.raises(RuntimeError, match="worker was killed"):
        search.sweep([], validate=lambda batch: None)
    lost, again = optuna.load_study(study_name="s", storage=url).trials
    assert (lost.state, again.state) == (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING)
    assert again.params == lost.params  # the next ask, of this study's next launch, takes it first
    assert retried(again) == 0


def test_a_trial_behind_the_median_is_pruned_and_reported_so(tmp_path):
    from charlm.search import PRUNED, PruneTrial

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(1.5, step=10)
    first.report(1.2, step=20)
    study.tell(first, 1.2)
    second = study.ask()
    pruner = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1}
    callback = PruneTrial(trial=second.number, storage=storage, sweep_dir=str(tmp_path), study_name="s", pruner=pruner)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=10, should_stop=False, estimated_stepping_batches=100,
                              default_root_dir=str(tmp_path), callback_metrics={"valid/bpc": 1.4})
    module = SimpleNamespace(kind=kind("char"))
    callback.setup(trainer, module, "fit")
    callback.on_validation_end(trainer, module)
    assert not trainer.should_stop and not (tmp_path / PRUNED).exists()  # ahead of the median: goes on
    trainer.global_step, trainer.callback_metrics = 20, {"valid/bpc": 1.3}  # its best, behind the median
    callback.on_validation_end(trainer, module)
    assert trainer.should_stop and json.loads((tmp_path / PRUNED).read_text())["valid/bpc"] == 1.3
    assert study.trials[1].intermediate_values == {10: 1.4, 20: 1.3}  # reported to the trial, as optuna-dashboard shows


def test_a_job_keeps_its_trial_alive_while_it_trains_and_a_dead_one_is_failed_by_its_heartbeat(tmp_path):
    from charlm.search import PruneTrial, fail_stale, open_storage, trial_id

    url = f"sqlite:///{tmp_path / 'optuna.db'}"  # SQLite's clock counts whole seconds: a grace of 3 s, not 1
    storage = open_storage(url, heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(study_name="s", storage=storage)
    storage.record_heartbeat(trial_id(storage, study, study.ask().number))  # the sweeper's, at the ask: from then on it is judged
    job = PruneTrial(trial=0, storage=url, sweep_dir=str(tmp_path), study_name="s", heartbeat_interval=1)
    trainer = SimpleNamespace(is_global_zero=True)
    job.setup(trainer, None, "fit")  # a job whose sweeper is gone (no heartbeat from it)
    time.sleep(4.5)
    fail_stale(study)
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # its job's heartbeat keeps it
    job.teardown(trainer, None, "fit")
    time.sleep(4.5)
    fail_stale(study)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]


def test_the_search_space_composes_and_a_bad_one_is_refused(tmp_path):
    cfg = compose_config("hparams_search=optuna", "hydra.sweep.dir=x", hydra=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.charlm_optuna_sweeper.OptunaSweeper"
    assert set(cfg.hydra.sweeper.params) >= {"optimizer.lr", "model.dropout", "data.seq_len", "model.hidden_size"}
    assert cfg.optimizer._target_.endswith("MuonAdamW") or "muon" in str(cfg.optimizer).lower()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from charlm.errors import CharlmError
    from charlm.search import distribution

    value = OverridesParser.create().parse_override("optimizer.lr=tag(log,interval(0.001,0.1))").value()
    assert distribution("optimizer.lr", value).log
    with pytest.raises(CharlmError, match="not a search space"):
        distribution("model.dropout", 0.5)
