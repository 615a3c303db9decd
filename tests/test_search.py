"""The Optuna search (hparams_search=optuna): a study in SQLite that a rerun continues, pruning, the report."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest

from charlm.symbols import kind
from conftest import FAST, ROOT, compose_config, run_train, write_tiny_ptb

# A small space over a tiny model; the command line's sweeps replace hparams_search/optuna.yaml's entries
SPACE = ("model.hidden_size=choice(16,24)", "data.seq_len=choice(5,10)", "optimizer.weight_decay=0.01",
         "model.dropout=0", "optimizer.lr=tag(log,interval(0.002,0.02))")
TINY = ("data.batch_size=4", "data.eval_batch_size=2", "trainer.precision=32-true", *FAST)


def trials(db) -> list:
    return optuna.load_study(study_name=db.parent.name, storage=f"sqlite:///{db}").get_trials()


def trial_dir(sweep, number: int):
    """The job directory of the trial `number` once Hydra has written its overrides, else None."""
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        if f"- trial={number}\n" in overrides.read_text():
            return overrides.parent.parent
    return None


def test_a_killed_search_is_continued_by_its_command_and_its_trials_grow(tmp_path):
    data = write_tiny_ptb(tmp_path / "ptb", repeat=600)  # ~900 windows an epoch: time to kill mid-trial
    sweep = tmp_path / "search"
    command = ["-m", "hparams_search=optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2",
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

    again = run_train(*command, data_dir=data, timeout=400)  # the same command: the study goes on
    assert again.returncode == 0, again.stderr[-3000:]
    after = trials(sweep / "optuna.db")
    assert len(after) == 4  # the two of the killed launch, and the two this one added
    assert after[1].state == optuna.trial.TrialState.FAIL  # killed: marked failed
    assert after[2].params == before[1].params  # asked again with its values, its job resumed from last.ckpt
    assert "resuming the interrupted job" in (sweep / after[2].user_attrs["dir"].split("/")[-1] / "train.log").read_text()
    assert [t.state for t in after[2:]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert after[0].value == before[0].value  # the completed trial was not run again
    assert len(list(sweep.glob("*/.hydra"))) == 3  # three distinct jobs: trials 1 and 2 share theirs

    search = json.loads((sweep / "search.json").read_text())
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
