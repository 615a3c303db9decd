"""Networks as plug-ins: a user's own network, defined here and kept outside charlm, goes through every
tool with no edit of charlm; checkpoints written before networks were plug-ins still load and resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import charlm
from charlm import api, checkpoint, evaluate, query
from conftest import FAST, ROOT, run_train, train_here, write_tiny_ptb

# A user's network: an Elman RNN whose state is a dict, with neither a one-symbol `step` nor `outputs=True`.
NETWORK = '''
import torch
from torch import nn


class ElmanLM(nn.Module):
    def __init__(self, vocab_size, hidden_size=16, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.rnn = nn.RNN(hidden_size, hidden_size, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, state=None):
        out, h = self.rnn(self.drop(self.embed(x)), None if state is None else state["h"])
        return self.decoder(self.drop(out)), {"h": h}
'''
CONFIG = "_target_: my_nets.ElmanLM\nhidden_size: 16\ndropout: 0.1\n"
TINY = ("data.batch_size=4", "data.eval_batch_size=2", "data.seq_len=8", *FAST)
FIXTURE = ROOT / "tests" / "fixtures" / "lstm-v1.ckpt"  # a 2x8 LSTM's last.ckpt, written before plug-ins


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """The user's own directory: my_nets.py and conf/model/elman.yaml, nowhere near charlm."""
    home = tmp_path_factory.mktemp("user")
    (home / "my_nets.py").write_text(NETWORK)
    (home / "conf" / "model").mkdir(parents=True)
    (home / "conf" / "model" / "elman.yaml").write_text(CONFIG)
    return home


def args(user: Path) -> tuple[str, ...]:
    return (f"hydra.searchpath=[file://{user / 'conf'}]", "model=elman")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_ptb(tmp_path_factory.mktemp("data") / "ptb")


@pytest.fixture(scope="module")
def run(user, data, tmp_path_factory) -> Path:
    """`python train.py hydra.searchpath=[file://...] model=elman`, as the user types it."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    proc = run_train(f"hydra.run.dir={run_dir}", *args(user), "trainer.max_epochs=2", *TINY, data_dir=data,
                     pythonpath=user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_users_network_trains_and_its_checkpoint_says_what_it_holds(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["valid"]["bpc"] < 4.0  # it learned (uniform: log2 V)
    ckpt = checkpoint.read(run / "checkpoints" / "best.ckpt")
    assert ckpt["charlm"]["net"] == {"_target_": "my_nets.ElmanLM", "hidden_size": 16, "dropout": 0.1}
    assert ckpt["charlm"]["symbols"] == "char" and ckpt["charlm"]["format"] == 2
    assert set(ckpt["charlm"]["train_state"]) == {"h"}  # its own state, saved as it is


def test_a_users_network_is_loaded_evaluated_queried_and_sampled(run, user, data, monkeypatch):
    monkeypatch.syspath_prepend(str(user))
    best = run / "checkpoints" / "best.ckpt"
    lm = charlm.load(best)
    assert type(lm.net).__name__ == "ElmanLM" and not hasattr(lm.net, "step")
    text = "the cat sat on the mat\nthe dog ate the cat"
    whole = lm.score(text)
    symbols, state, total = lm.symbols(text), None, 0.0
    for symbol, nxt in zip(symbols, symbols[1:]):  # one symbol at a time through forward, the state carried
        logp, state = lm.next_logprobs(state, symbol)
        total -= float(logp[lm.vocab.index[nxt]])
    assert total / (len(symbols) - 1) == pytest.approx(whole["nll"], abs=1e-5)
    assert lm.score(text, dynamic=api.Dynamic(segment_len=5))["nll"] != whole["nll"]  # it adapted
    assert lm.sample("the ", length=20, seed=1) == lm.sample("the ", length=20, seed=1) != "the "

    assert evaluate.main([str(best), "--data-dir", str(data), "--output", str(run / "e.json")]) == 0  # batch 1
    assert json.loads((run / "e.json").read_text())["bpc"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["valid"]["bpc"], abs=0.05)
    out = io.StringIO()
    query.serve(lm, ["t\n", "h\n", "Q\n"], out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "OK GO" and len(lines[1].split()) == len(lm.vocab) and lines[3].startswith("error:")


def test_a_users_network_resumes_exactly(run, user, data, tmp_path):
    """One epoch, then resumed to two from its last.ckpt: the same figures as two epochs in one go."""
    half = tmp_path / "half"
    assert run_train(f"hydra.run.dir={half}", *args(user), "trainer.max_epochs=1", *TINY,
                     data_dir=data, pythonpath=user).returncode == 0
    proc = run_train(f"hydra.run.dir={half}", *args(user), "trainer.max_epochs=2", *TINY,
                     f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}", data_dir=data, pythonpath=user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, whole = (json.loads((d / "metrics.json").read_text()) for d in (half, run))
    assert resumed["steps"] == whole["steps"] and resumed["valid"]["bpc"] == whole["valid"]["bpc"]


def test_a_users_network_runs_in_a_sweep_and_a_search(user, data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", f"hydra.sweep.dir={sweep}", *args(user), "model.hidden_size=8,12", "debug=smoke", *TINY,
                     data_dir=data, pythonpath=user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "summary.csv").read_text().count("completed") == 2
    search = tmp_path / "search"
    proc = run_train("-m", "hparams_search=optuna", f"hydra.sweep.dir={search}", *args(user),
                     "hydra.sweeper.n_trials=2", "~model.num_layers", "trainer.precision=32-true", "debug=smoke",
                     *TINY, data_dir=data, pythonpath=user)  # the preset's search space, less its LSTM key
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((search / "search.json").read_text())["best"]["command"].count("model=elman") == 1


# --- checkpoints written before networks were plug-ins ------------------------------------------------------
def test_an_earlier_checkpoint_loads_and_scores_as_it_did():
    expected = json.loads(FIXTURE.with_suffix(".expected.json").read_text())  # written by the earlier version
    lm = charlm.load(FIXTURE)
    text = expected["text"]
    assert lm.score(text)["bpc"] == pytest.approx(expected["score"], abs=1e-5)
    assert lm.score(text, batch_size=2)["bpc"] == pytest.approx(expected["score_b2"], abs=1e-5)
    assert lm.score(text, dynamic=api.Dynamic(segment_len=10))["bpc"] == pytest.approx(expected["dynamic"], abs=1e-5)
    state = None
    for symbol, row in zip("the_c", expected["query"]):
        logp, state = lm.next_logprobs(state, symbol)
        torch.testing.assert_close(logp, torch.tensor(row), atol=1e-5, rtol=0)
    assert lm.sample("the ", length=30, greedy=True) == expected["greedy"]


# Lightning says so when a run resumes a checkpoint written in another directory, as this fixture was
@pytest.mark.filterwarnings("ignore:The dirpath has changed from '/tmp/fx/run/checkpoints':UserWarning")
def test_an_earlier_checkpoint_resumes(tiny_data, tmp_path):
    """The fixture is a 2x8 LSTM's last.ckpt after 1 epoch on the tiny text; it trains a second epoch."""
    before = torch.load(FIXTURE, weights_only=True)
    metrics = train_here(tmp_path / "run", f"ckpt_path={FIXTURE}", "trainer.max_epochs=2", "model.hidden_size=8",
                         "data.batch_size=4", "data.eval_batch_size=2", *FAST, data_dir=tiny_data)
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["steps"] == 2 * before["global_step"]
    assert metrics["history"][0]["epoch"] == 1 and len(metrics["history"]) == 2  # the first epoch's row came along


@pytest.mark.parametrize("net", ["gru", "mogrifier"])
def test_the_gru_and_the_mogrifier_train_and_resume_exactly(net, tiny_data, tmp_path):
    """Each with every regulariser on (their masks drawn as the LSTM's): one epoch resumed to two gives the
    figures of two in one go, and the checkpoint loads in charlm.load with its own kind of state."""
    common = ("model.hidden_size=16", "model.dropout=0.2", "model.locked_dropout=true", "model.weight_drop=0.3",
              "model.dropout_embedding=0.1", "loss.ar_alpha=1", "loss.tar_beta=1", "data.variable_length=true",
              "data.batch_size=4", "data.eval_batch_size=2", *FAST)
    whole = train_here(tmp_path / "whole", f"model={net}", "trainer.max_epochs=2", *common, data_dir=tiny_data)
    train_here(tmp_path / "half", f"model={net}", "trainer.max_epochs=1", *common, data_dir=tiny_data)
    resumed = train_here(tmp_path / "half", f"model={net}", "trainer.max_epochs=2", *common,
                         f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}", data_dir=tiny_data)
    assert resumed["valid"]["bpc"] == whole["valid"]["bpc"] and resumed["steps"] == whole["steps"]
    lm = charlm.load(tmp_path / "whole" / "checkpoints" / "best.ckpt")
    assert type(lm.net).__name__ == {"gru": "GRULM", "mogrifier": "MogrifierLM"}[net]
    assert lm.score("the cat sat")["bpc"] < 6 and len(lm.sample("the ", length=10, seed=0)) > 4
