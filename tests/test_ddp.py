"""trainer=ddp: 2 processes on CPU (gloo) train exactly what 1 process trains on the same global batch."""

import json

import pytest
import torch

from conftest import FAST, run_train

# dropout 0: the two ranks draw different dropout masks than one process would.
COMMON = ("model.dropout=0", "model.hidden_size=16", "data.seq_len=7", "data.batch_size=4", "data.eval_batch_size=2",
          "trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=5",
          "trainer.limit_test_batches=5", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", *FAST)


def test_two_processes_train_the_same_model_as_one(tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_train(f"hydra.run.dir={one}", *COMMON, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_train(f"hydra.run.dir={two}", "trainer=ddp", "trainer.devices=2", *COMMON, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["status"] == "completed" and m2["steps"] == m1["steps"] == 12  # global batch 4 either way
    for split in ("train", "valid", "test"):  # token-weighted over both ranks' shards, synced
        assert m2[split]["nll"] == pytest.approx(m1[split]["nll"], rel=1e-5)
    for h1, h2 in zip(m1["history"], m2["history"], strict=True):
        assert h2["valid/nll"] == pytest.approx(h1["valid/nll"], rel=1e-5)
        assert h2["train/nll"] == pytest.approx(h1["train/nll"], rel=1e-5)

    w1, w2 = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
              for d in (one, two))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)
    assert m1["history"][1]["train/nll"] < m1["history"][0]["train/nll"]  # it learned: the weights moved


def test_two_processes_end_a_time_budget_at_the_same_step(tiny_data, tmp_path):
    """Each process times its own steps; both end where the first decides (else one waits for the other forever)."""
    run = tmp_path / "run"
    proc = run_train(f"hydra.run.dir={run}", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                     "model.hidden_size=16", "data.batch_size=4", "data.eval_batch_size=2", "optimizer=adamw",
                     "scheduler=onecycle_budget", "trainer.max_epochs=100", "trainer.max_time=00:00:00:20", *FAST,
                     data_dir=tiny_data, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["history"][-1]["step"] == metrics["steps"] > 20
    assert metrics["wall_time_s"] <= 20 * 1.3
