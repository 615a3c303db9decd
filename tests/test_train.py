"""`python train.py` end to end, and the composed config the user gets."""

import json
import re

import pytest
import torch

from conftest import FAST, compose_config, run_train, train_here


def test_default_config_is_the_course_report():
    cfg = compose_config()
    assert (cfg.data.seq_len, cfg.data.batch_size) == (10, 20)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.dropout, cfg.model.init_range) == (200, 2, 0.2, 0.1)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 1.0
    assert cfg.trainer.gradient_clip_val == 5 and cfg.trainer.max_epochs == 2
    assert cfg.scheduler.decay == 2 and cfg.data.level == "char"


def test_optimizer_is_one_override_away():
    assert compose_config("optimizer=adamw").optimizer._target_ == "torch.optim.AdamW"


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
    assert "ppl56" in proc.stdout and metrics["test_checkpoint"] == "best.ckpt"  # the final table says what it scored
    assert "valid (last epoch)" in proc.stdout and "test (best.ckpt)" in proc.stdout
    assert f"best valid bpc: {metrics['best_valid_bpc']:.4f}" in proc.stdout


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])  # muon: two optimisers' states in one checkpoint
def test_resume_from_checkpoint_continues_training(optimizer, tiny_data, tmp_path):
    first = tmp_path / "first"
    common = ("data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=16", f"optimizer={optimizer}", *FAST)
    train_here(first, "trainer.max_epochs=1", *common, data_dir=tiny_data)
    metrics = train_here(tmp_path / "second", "trainer.max_epochs=2", *common,
                         f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", data_dir=tiny_data)
    assert metrics["epochs"] == 2 and [h["epoch"] for h in metrics["history"]] == [1, 2]


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=0", "data.seq_len=0 is out of range: it must be an integer >= 1"),
    ("data.batch_size=-3", "data.batch_size=-3 is out of range"),
    ("model.dropout=1.0", "model.dropout=1.0 is out of range: it must be a number in [0, 1)"),
    ("model.hidden_size=0", "model.hidden_size=0 is out of range"),
    ("data.level=bytes", "data.level='bytes' is not allowed"),
    ("trainer.max_time=garbage", "trainer.max_time='garbage' is out of range: it must be a duration"),
    ("trainer.precision=fp8", "trainer: Precision 'fp8' is invalid"),
    ("+model.layers=3", "model: LSTMLM.__init__() got an unexpected keyword argument 'layers'"),
    ("model=mogrifier model.rounds=-1", "model.rounds=-1 is out of range"),
] + ([] if torch.cuda.is_available() else [("trainer.accelerator=gpu", "trainer: No supported gpu backend found")]))
def test_bad_values_are_refused_before_anything_is_written(override, message, tiny_data, tmp_path):
    from charlm.errors import CharlmError

    with pytest.raises(CharlmError, match=re.escape(message)) as error:
        train_here(tmp_path / "run", *override.split(), data_dir=tiny_data)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unwritable_run_dir_is_refused_in_one_line(tiny_data):
    from charlm.errors import CharlmError
    from charlm.train import fit

    with pytest.raises(CharlmError, match=r"cannot write the output directory /proc/charlm-run .*set run_dir") as e:
        fit(compose_config("run_dir=/proc/charlm-run", f"paths.data_dir={tiny_data}"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, line", [
    ("model.dropout=1.0", "error: model.dropout=1.0 is out of range: it must be a number in [0, 1)"),
    ("model.ar_alpha=2", "error: model.ar_alpha is now loss.ar_alpha: pass loss.ar_alpha=2"),
])
def test_a_bad_value_is_one_line_on_stderr_and_exit_2(override, line, tiny_data, tmp_path):
    proc = run_train(f"hydra.run.dir={tmp_path / 'run'}", override, data_dir=tiny_data)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [line]


def test_history_records_the_learning_rate_each_epoch_trained_at(tiny_data, tmp_path):
    history = train_here(tmp_path / "run", "data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=8",
                         "trainer.max_epochs=3", "scheduler.max_epoch=1", "test=false", *FAST,
                         data_dir=tiny_data)["history"]
    assert [h["lr"] for h in history] == [1.0, 1.0, 0.5]  # main.lua: epochs 1..max_epoch+1 at lr, then halved


def test_resuming_a_finished_run_is_refused_and_its_results_kept(tiny_data, tmp_path):
    from charlm.errors import CharlmError

    run_dir = tmp_path / "run"
    common = ("data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=16", *FAST)
    train_here(run_dir, *common, "trainer.max_epochs=1", data_dir=tiny_data)
    metrics = (run_dir / "metrics.json").read_bytes()
    last = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(CharlmError, match="finished run") as error:
        train_here(run_dir, *common, "trainer.max_epochs=1", f"ckpt_path={last}", data_dir=tiny_data)
    assert "raise trainer.max_epochs above 1" in str(error.value) and "\n" not in str(error.value)
    assert (run_dir / "metrics.json").read_bytes() == metrics  # nothing written is lost
    extended = train_here(run_dir, *common, "trainer.max_epochs=2", f"ckpt_path={last}", data_dir=tiny_data)
    assert extended["status"] == "completed" and extended["epochs"] == 2 and len(extended["history"]) == 2


def test_lightnings_progress_bar_switch_works(tiny_data, tmp_path):
    """trainer.enable_progress_bar=false takes the configured progress bar with it (Lightning refuses both)."""
    from charlm.train import build

    cfg = compose_config(f"data.data_dir={tiny_data}", f"run_dir={tmp_path}", "trainer.enable_progress_bar=false")
    assert build(cfg)[2].progress_bar_callback is None
    cfg = compose_config(f"data.data_dir={tiny_data}", f"run_dir={tmp_path}")
    assert build(cfg)[2].progress_bar_callback.refresh_rate == cfg.callbacks.progress_bar.refresh_rate


def test_an_impossible_batch_size_is_refused_before_the_model_is_built(tiny_data, tmp_path):
    proc = run_train(f"hydra.run.dir={tmp_path / 'run'}", "data.batch_size=100000000", data_dir=tiny_data)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: data.batch_size=100000000 is too large") and "at most" in lines[0]
    assert "params" not in proc.stdout and "Sanity" not in proc.stdout + proc.stderr  # no summary, no sanity check


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_gradient_clipping_follows_the_trainers_algorithm(algorithm):
    import torch

    from charlm.module import LanguageModel
    from charlm.nets import LSTMLM

    model = LanguageModel(LSTMLM(5, hidden_size=8), list("abcde"))
    for p in model.parameters():
        p.grad = torch.linspace(-3, 3, p.numel()).view_as(p)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.configure_gradient_clipping(optimizer, 0.5, algorithm)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if algorithm == "value":
        assert grads.abs().max() == pytest.approx(0.5) and (grads.abs() == 0.5).sum() > 1
    else:
        assert grads.norm() == pytest.approx(0.5, rel=1e-4) and grads.abs().max() < 0.5


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_what_a_user_compares_runs_by(tiny_data, tmp_path):
    """A finished run served by a real TensorBoard on 127.0.0.1: its scalars, its text samples, and an HPARAMS
    tab of the values that define the experiment under readable names, with no plumbing."""
    import subprocess
    import sys
    import time
    import urllib.request

    run_dir = tmp_path / "run"  # from the command line: the HPARAMS tab names each config group by its choice
    proc = run_train(f"hydra.run.dir={run_dir}", "debug=smoke", "data.batch_size=4", "data.eval_batch_size=2",
                     "model.hidden_size=16", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path: str, body: dict | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 90
        while True:
            try:
                runs = get("/data/runs")
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "TensorBoard did not start"
                time.sleep(0.5)
        assert runs == ["tensorboard"]
        scalars = set(get("/data/plugin/scalars/tags")["tensorboard"])
        assert {"train/loss", "train/step_bpc", "train/grad_norm", "valid/bpc",
                "valid/best_bpc", "test/bpc", "lr-SGD"} <= scalars
        texts = sorted(get("/data/plugin/text/tags")["tensorboard"])
        assert texts == ["valid/bits_by_position/text_summary", "valid/sample/text_summary"]
        experiment = get("/data/plugin/hparams/experiment", {"experimentName": ""})
        columns = {h["name"]: h for h in experiment["hparamInfos"]}
        assert {"data/seq_len", "data/batch_size", "model/hidden_size", "model/dropout", "optimizer", "optimizer/lr",
                "scheduler", "trainer/max_epochs", "trainer/gradient_clip_val", "seed"} <= set(columns)
        groups = get("/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [{"hparam": n} for n in columns],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
        values = groups["sessionGroups"][0]["hparams"]
        assert (values["optimizer"], values["scheduler"], values["data"]) == ("sgd", "zaremba", "ptb_char")
        assert (values["model/hidden_size"], values["data/batch_size"], values["optimizer/lr"]) == (16, 4, 1.0)
        plumbing = ("_target_", "data_dir", "cache", "download", "verify", "accelerator", "devices", "progress_bar")
        assert not [name for name in columns if any(p in name for p in plumbing)] and len(columns) <= 36
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["valid/best_bpc"]
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def long_epoch(tmp_path_factory):
    """Thousands of windows an epoch at batch 4: a budget of seconds ends inside the first epoch."""
    from conftest import write_tiny_ptb

    return write_tiny_ptb(tmp_path_factory.mktemp("long") / "ptb", repeat=3000)


def windows_per_epoch(data_dir) -> int:
    from charlm.data import PTBDataModule

    data = PTBDataModule(str(data_dir), batch_size=4, download=False)
    data.setup()
    return len(data.train_dataloader())


BUDGETED = ("optimizer=adamw", "optimizer.lr=0.004", "scheduler=onecycle_budget", "trainer.max_epochs=100",
            "data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=16", "trainer.log_every_n_steps=10", *FAST)


def annealed(run_dir) -> tuple[float, float]:
    """The learning rate the last step trained at and the schedule's final one, from last.ckpt."""
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    factor = ckpt["lr_schedulers"][0]["lr_lambdas"][0]
    return ckpt["optimizer_states"][0]["param_groups"][0]["lr"], 0.004 * factor["end"]


def test_a_time_budget_ends_annealed_and_validated_inside_the_first_epoch(long_epoch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    metrics = train_here(run_dir, *BUDGETED, "trainer.max_time=00:00:00:10", data_dir=long_epoch)
    assert metrics["status"] == "completed" and metrics["wall_time_s"] <= 10 * 1.15  # (3% on a quiet machine)
    assert metrics["steps"] < windows_per_epoch(long_epoch)  # inside the first epoch
    assert [row["step"] for row in metrics["history"]] == [metrics["steps"]]  # validated at its end
    lr, end = annealed(run_dir)
    assert lr == pytest.approx(end)  # the schedule ran to its end
    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.*")).parent))
    events.Reload()
    lrs = events.Scalars("lr-AdamW")
    assert len(lrs) >= 5 and lrs[0].value < max(x.value for x in lrs) > lrs[-1].value  # step-wise, one cycle


def test_a_killed_budgeted_run_resumes_with_the_budget_it_has_left(long_epoch, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch

    from conftest import ROOT

    run_dir = tmp_path / "run"
    command = [f"hydra.run.dir={run_dir}", *BUDGETED, "trainer.max_time=00:00:00:16", "checkpoint.every_n_train_steps=200"]
    env = dict(__import__("os").environ, CHARLM_DATA_DIR=str(long_epoch), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *command], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    spent = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["TimeBudget"]["spent"]
    assert 0 < spent < 16

    resumed = run_train(*command, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", data_dir=long_epoch)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["wall_time_s"] <= (16 - spent) * 1.1 + 1  # the budget it had left, not a new one
    assert metrics["history"][-1]["step"] == metrics["steps"] > 200
    lr, end = annealed(run_dir)
    assert lr == pytest.approx(end)


@pytest.mark.slow  # 150 s: the budget a user tries first
def test_a_150_s_budget_on_the_course_network_ends_annealed_within_it(real_data, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train_here(run_dir, "optimizer=adamw", "optimizer.lr=0.004", "scheduler=onecycle_budget",
                         "trainer.max_time=00:00:02:30", "trainer.max_epochs=100", *FAST, data_dir=real_data)
    assert 150 * 0.97 <= metrics["wall_time_s"] <= 150 * 1.03
    assert metrics["history"][-1]["step"] == metrics["steps"]
    lr, end = annealed(run_dir)
    assert lr == pytest.approx(end)
