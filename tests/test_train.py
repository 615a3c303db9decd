"""`python train.py` end to end, and the composed config the user gets."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import FAST, ROOT, run_train


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["run_dir=/tmp/x", *overrides])


def test_default_config_is_the_course_report():
    cfg = compose_train()
    assert (cfg.data.seq_len, cfg.data.batch_size) == (10, 20)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.dropout, cfg.model.init_range) == (200, 2, 0.2, 0.1)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 1.0
    assert cfg.trainer.gradient_clip_val == 5 and cfg.trainer.max_epochs == 2
    assert cfg.scheduler.lr_lambda.decay == 2 and cfg.data.level == "char"


def test_optimizer_is_one_override_away():
    assert compose_train("optimizer=adamw").optimizer._target_ == "torch.optim.AdamW"


def test_train_subprocess_writes_metrics_tensorboard_and_checkpoints(real_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(f"hydra.run.dir={run_dir}", "trainer.limit_train_batches=30", "trainer.limit_val_batches=10",
                     "trainer.limit_test_batches=10", "trainer.log_every_n_steps=5", *FAST, data_dir=real_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    for key in ("valid", "test"):
        assert 3.0 < metrics[key]["bpc"] < 6.0  # better than chance (log2 50 = 5.64) is not expected this early
        assert metrics[key]["ppl56"] == pytest.approx(2 ** (5.6 * metrics[key]["bpc"]), rel=1e-4)
    assert metrics["best_valid_bpc"] == pytest.approx(min(h["valid/bpc"] for h in metrics["history"]), rel=1e-6)
    assert metrics["wall_time_s"] > 0 and len(metrics["history"]) == 2
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/chars_per_sec", "valid/bpc", "test/bpc", "lr-SGD"} <= tags
    assert json.loads((run_dir / "vocab.json").read_text())[:4] == ["a", "e", "r", "_"]
    assert "valid" in proc.stdout and "ppl56" in proc.stdout  # the final table


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])  # muon: two optimisers' states in one checkpoint
def test_resume_from_checkpoint_continues_training(optimizer, tiny_data, tmp_path):
    first = tmp_path / "first"
    common = ("data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=16", f"optimizer={optimizer}", *FAST)
    assert run_train(f"hydra.run.dir={first}", "trainer.max_epochs=1", *common, data_dir=tiny_data).returncode == 0
    second = tmp_path / "second"
    proc = run_train(f"hydra.run.dir={second}", "trainer.max_epochs=2", *common,
                     f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and [h["epoch"] for h in metrics["history"]] == [1, 2]


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=0", "data.seq_len=0 is out of range: it must be an integer >= 1"),
    ("data.batch_size=-3", "data.batch_size=-3 is out of range"),
    ("model.dropout=1.0", "model.dropout=1.0 is out of range: it must be a number in [0, 1)"),
    ("model.hidden_size=0", "model.hidden_size=0 is out of range"),
    ("data.level=bytes", "data.level='bytes' is not allowed"),
])
def test_bad_values_are_one_line_errors(override, message, tiny_data, tmp_path):
    proc = run_train(f"hydra.run.dir={tmp_path / 'run'}", override, data_dir=tiny_data)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {lines[0][7:]}"] and message in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_history_records_the_learning_rate_each_epoch_trained_at(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(f"hydra.run.dir={run_dir}", "data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=8",
                     "trainer.max_epochs=3", "scheduler.lr_lambda.max_epoch=1", "test=false", *FAST, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["lr"] for h in history] == [1.0, 1.0, 0.5]  # main.lua: epochs 1..max_epoch+1 at lr, then halved
