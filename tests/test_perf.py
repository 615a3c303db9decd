"""Performance work that must not change behaviour: the token cache, the model's layout, the benchmark's
two loops, and the presets (they compose, and each trains a few steps on CPU)."""

import importlib.util
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.profilers import SimpleProfiler
from torch import nn

from charlm import cache, config
from charlm.data import PTBDataModule
from charlm.model import LSTMLM, dropout, dropout_masks
from charlm.train import NoProfiler, build
from conftest import FAST, ROOT, run_train, write_tiny_ptb


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["run_dir=/tmp/x", *overrides])


# --- the token cache ---------------------------------------------------------------------------------
@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "charlm"


def load(data_dir, **kw):
    dm = PTBDataModule(str(data_dir), download=False, verify=False, **kw)
    dm.setup()
    return dm


def test_cache_is_written_beside_the_data_and_then_used(tiny_data, user_cache, monkeypatch):
    first = load(tiny_data)
    assert (tiny_data / "ptb.char.ids.pt").is_file() and not user_cache.exists()
    monkeypatch.setattr("charlm.data.read_splits", lambda paths: pytest.fail("the text files were read again"))
    second = load(tiny_data)
    assert second.vocab == first.vocab
    assert all(torch.equal(second.ids[s], first.ids[s]) and second.ids[s].dtype == torch.long for s in first.ids)


def test_changed_text_rebuilds_the_cache(tiny_data, user_cache):
    before = load(tiny_data)
    train = tiny_data / "ptb.char.train.txt"
    train.write_text("z _ " + train.read_text())  # a new first symbol: new vocabulary order and ids
    after = load(tiny_data)
    assert after.vocab.symbols[0] == "z" and after.vocab != before.vocab
    assert after.ids["train"].numel() == before.ids["train"].numel() + 2
    assert load(tiny_data, cache=False).vocab == after.vocab  # what the text files say


@pytest.mark.parametrize("damage", ["garbage", "truncated", "altered ids"])
def test_damaged_cache_is_rebuilt_not_trusted(tiny_data, user_cache, damage, monkeypatch):
    good = load(tiny_data)
    path = tiny_data / "ptb.char.ids.pt"
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # a well-formed file whose ids no longer match its checksum
        saved = torch.load(path, weights_only=True)
        saved["ids"]["valid"][0] = (saved["ids"]["valid"][0] + 1) % len(saved["symbols"])
        torch.save(saved, path)
    again = load(tiny_data)
    assert all(torch.equal(again.ids[s], good.ids[s]) for s in good.ids)
    monkeypatch.setattr("charlm.data.read_splits", lambda paths: pytest.fail("the rebuilt cache was not used"))
    assert load(tiny_data).vocab == good.vocab


def test_read_only_data_dir_falls_back_to_the_user_cache(tmp_path, user_cache):
    data = write_tiny_ptb(tmp_path / "ro")
    os.chmod(data, 0o555)
    try:
        first = load(data)
        assert not list(data.glob("*.pt")) and not list(data.glob(".*"))
        assert [p.parent for p in cache.locations(data, "char")] == [data.resolve(), user_cache]
        assert cache.locations(data, "char")[1].is_file()
        assert torch.equal(load(data).ids["test"], first.ids["test"])
    finally:
        os.chmod(data, 0o755)


def test_cache_can_be_turned_off(tiny_data, user_cache):
    load(tiny_data, cache=False)
    assert not (tiny_data / "ptb.char.ids.pt").exists() and not user_cache.exists()


# --- the model's layout and its CPU dropout ----------------------------------------------------------
def test_time_major_model_equals_batch_first_lstm_without_dropout():
    """The network runs time-major inside; its API and results are those of a batch_first LSTM."""
    net = LSTMLM(11, 16, 2, dropout=0.3).eval()
    ref = nn.LSTM(16, 16, 2, batch_first=True)
    ref.load_state_dict(net.lstm.state_dict())
    x = torch.randint(0, 11, (4, 7))
    logits, (h, c) = net(x)
    out, (h_ref, c_ref) = ref(net.embed(x))
    assert logits.shape == (4, 7, 11)
    torch.testing.assert_close(logits, net.decoder(out))
    torch.testing.assert_close((h, c), (h_ref, c_ref))


def test_training_runs_layer_by_layer_with_the_projects_dropout_between():
    """On CPU in training the layers run one at a time with charlm's dropout between (same parameters);
    with a seed, the masks come in the order embedding, between layers, output."""
    torch.manual_seed(0)
    net = LSTMLM(11, 16, 2, dropout=0.3).train()
    layers = [nn.LSTM(16, 16, 1) for _ in range(2)]
    for k, layer in enumerate(layers):
        layer.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in net.lstm.state_dict().items()
                               if n.endswith(f"_l{k}")})
    x, h0, c0 = torch.randint(0, 11, (4, 7)), torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    torch.manual_seed(1)
    logits, (h, c) = net(x, (h0, c0))
    torch.manual_seed(1)
    out = dropout(net.embed(x.t()), 0.3)
    out, (h1, c1) = layers[0](out, (h0[:1], c0[:1]))
    out, (h2, c2) = layers[1](dropout(out, 0.3), (h0[1:], c0[1:]))
    torch.testing.assert_close(logits, net.decoder(dropout(out, 0.3)).transpose(0, 1))
    torch.testing.assert_close((h, c), (torch.cat([h1, h2]), torch.cat([c1, c2])))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_cpu_dropout_drops_p_and_keeps_the_expectation(p):
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005  # 400k draws: the standard error is under 0.001
    assert abs(y.mean().item() - 1) < 0.01
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / (1 - p)), rtol=1e-4))
    y.sum().backward()  # the gradient passes the kept elements, scaled as they were
    torch.testing.assert_close(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x, p), y)  # a seed gives the same mask
    assert not torch.equal(dropout(x, p), y)  # and the generator moves on
    # the masks of neighbouring elements are independent: no pattern in the four per 64-bit draw
    kept = (y != 0).float().view(-1, 4)
    assert torch.corrcoef(kept.t()).fill_diagonal_(0).abs().max() < 0.01


def test_a_steps_masks_in_one_draw_are_the_masks_of_successive_calls():
    """The network draws a step's masks at once; they are the masks three calls of `dropout` would draw."""
    x = torch.ones(10, 6, 8)
    torch.manual_seed(3)
    masks = dropout_masks(x, 0.2, 3)
    torch.manual_seed(3)
    assert masks.shape == (3, 10, 6, 8) and torch.equal(masks, torch.stack([dropout(x, 0.2) for _ in range(3)]))
    assert dropout_masks(torch.ones(7), 0.5, 3).shape == (3, 7)  # not a multiple of four


def test_cpu_dropout_is_the_identity_when_off_and_keeps_the_dtype():
    x = torch.randn(3, 5)
    assert dropout(x, 0.2, training=False) is x and torch.equal(dropout(x, 0.0), x)
    assert dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16
    assert dropout(torch.ones(7), 0.5).shape == (7,)  # sizes that are not a multiple of four


def load_bench(name: str):
    """A script of bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_is_not_faulted_in_again_each_step(real_data):
    """At 2x512 glibc's defaults fault some 8,000 pages back in every training step (weight gradients,
    oneDNN's workspaces); with cpu.keep_freed_memory the steps reuse them. Each in a fresh process."""
    probe = load_bench("page_faults")

    def faults_per_step(variant: str) -> float:  # in_fresh_process raises, with the child's stderr, if it fails
        spec = [variant, ["model.hidden_size=512", f"data.data_dir={real_data}"]]
        return probe.bench.in_fresh_process(probe.__file__, spec)["faults_per_step"]

    assert faults_per_step("project") < 100 < 1000 < faults_per_step("project, keep_freed_memory off")


@pytest.mark.parametrize("argv, writes_docs", [([], True), (["--rounds", "3"], True), (["--quick"], False),
                                               (["--configs", "course"], False), (["--steps", "10"], False),
                                               (["--cpu-time"], False)])
def test_only_a_full_benchmark_replaces_the_documented_table(argv, writes_docs, tmp_path):
    bench = load_bench("throughput")
    assert bench.docs_target(bench.make_parser().parse_args(argv)) == (bench.DOCS if writes_docs else None)
    mine = tmp_path / "table.md"  # --docs always writes where it is told
    assert bench.docs_target(bench.make_parser().parse_args([*argv, "--docs", str(mine)])) == mine


def test_quick_times_the_course_configuration_in_full_and_2x512_at_half():
    bench = load_bench("throughput")
    steps = {name: n for name, _, n, _ in bench.plan(bench.make_parser().parse_args(["--quick"]))}
    assert steps == {"course": bench.CONFIGS["course"][1], "2x512": bench.CONFIGS["2x512"][1] // 2}
    assert {n for _, _, n, _ in bench.plan(bench.make_parser().parse_args(["--steps", "7"]))} == {7}


# --- the benchmark's two loops train the same thing ----------------------------------------------------
def test_plain_loop_module_loop_barebones_and_project_give_the_same_losses(real_data, tmp_path):
    bench = load_bench("throughput")
    overrides = ["model.dropout=0", "model.hidden_size=32", f"data.data_dir={real_data}"]
    steps = 12

    class Losses(bench.L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    def fit(extra: list[str], run_dir):  # -> the losses, the trainer, the config and the data
        cfg = bench.compose_config([*overrides, *bench.BENCH, f"trainer.limit_train_batches={steps}", *extra],
                                   str(run_dir))
        losses = Losses()
        datamodule, model, trainer = bench.build(cfg, extra_callbacks=[losses])
        trainer.fit(model, datamodule=datamodule)
        return losses.values, trainer, cfg, datamodule

    project, trainer, cfg, datamodule = fit(["trainer.enable_progress_bar=false", "~callbacks.progress_bar"],
                                            tmp_path / "project")
    assert (tmp_path / "project" / "tensorboard").exists() and trainer.checkpoint_callback is not None
    barebones, trainer, _, _ = fit(bench.BAREBONES, tmp_path / "barebones")  # the Trainer with nothing on
    assert trainer.barebones and trainer.checkpoint_callback is None and not (tmp_path / "barebones").exists()
    _, plain = bench.plain_loop(cfg, datamodule.ids["train"], len(datamodule.vocab), steps)
    _, module = bench.module_loop(overrides, steps)  # the project's module without the Trainer
    assert len(plain) == len(module) == len(project) == len(barebones) == steps
    torch.testing.assert_close(torch.tensor(project), torch.tensor(plain), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(module), torch.tensor(project), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(barebones), torch.tensor(project), rtol=1e-6, atol=1e-6)
    assert plain[-1] < plain[0]  # and it learns


@pytest.mark.parametrize("override, kind", [(None, NoProfiler), ("trainer.profiler=simple", SimpleProfiler)])
def test_the_default_profiler_is_free_and_a_real_one_can_be_asked_for(tiny_data, tmp_path, override, kind):
    cfg = compose_train(f"data.data_dir={tiny_data}", f"run_dir={tmp_path}", *filter(None, [override]))
    trainer = build(cfg)[2]
    assert type(trainer.profiler) is kind
    with trainer.profiler.profile("a hook"):
        pass


def test_step_profile_splits_each_loops_step_into_parts_that_add_up(real_data, monkeypatch):
    profile = load_bench("step_profile")
    monkeypatch.setattr(profile, "STEPS", 5)
    monkeypatch.setattr(profile, "WARMUP", 2)
    overrides = ["model.hidden_size=16", f"data.data_dir={real_data}"]
    for row in (profile.plain(overrides), profile.project(overrides)):
        assert row["lstm"] > 0 and row["other ops"] > 0 and row["step"] > row["lstm"] + row["other ops"]
        assert row["lstm"] + row["other ops"] + row["python and loop"] == pytest.approx(row["step"])


def test_manual_tbptt_probe_trains_exactly_as_the_project(real_data):
    """bench/manual_tbptt.py measures only speed: K windows per training_step give the project's weights."""
    probe = load_bench("manual_tbptt")

    class Keep(L.Callback):
        def on_train_end(self, trainer, pl_module):
            self.weights = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    overrides = ["model.hidden_size=16", f"data.data_dir={real_data}"]
    project, manual = Keep(), Keep()
    probe.bench.run_project(overrides, 4, 2, "cpu", callbacks=[project])  # 6 steps of one window
    probe.run_manual(overrides, 2, 4, 2, callbacks=[manual])  # 3 training_steps of two windows
    assert project.weights.keys() == manual.weights.keys()
    for k in project.weights:
        torch.testing.assert_close(manual.weights[k], project.weights[k], rtol=1e-5, atol=1e-6)


def test_page_fault_probe_counts_the_timed_steps_of_both_loops(real_data, monkeypatch):
    probe = load_bench("page_faults")
    monkeypatch.setattr(probe, "STEPS", 4)
    monkeypatch.setattr(probe, "WARMUP", 2)
    overrides = ["model.hidden_size=16", f"data.data_dir={real_data}"]
    for variant in probe.VARIANTS:
        row = probe.measure(variant, overrides)
        assert row["chars_per_sec"] > 0 and row["faults_per_step"] >= 0


# --- presets -------------------------------------------------------------------------------------------
def test_presets_compose_within_their_budgets():
    fast = compose_train("experiment=fast_2x200")
    course = compose_train()
    assert (fast.model.hidden_size, fast.model.num_layers) == (course.model.hidden_size, course.model.num_layers)
    assert fast.trainer.max_epochs <= course.trainer.max_epochs
    hour = compose_train("experiment=cpu_hour")
    days, hours, minutes, seconds = map(int, hour.trainer.max_time.split(":"))
    assert (days, hours * 60 + minutes + seconds / 60) <= (0, 60)
    gpu = compose_train("experiment=gpu_best")
    assert (gpu.model.num_layers, gpu.model.hidden_size) == (3, 1000) and gpu.trainer.max_time
    for cfg in (fast, hour, gpu):
        config.check(cfg)
        assert cfg.scheduler.total_steps == "auto" and cfg.scheduler.interval == "step"


@pytest.mark.parametrize("preset", ["fast_2x200", "cpu_hour", "gpu_best"])
def test_preset_trains_a_few_steps_on_cpu(preset, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(f"hydra.run.dir={run_dir}", f"experiment={preset}", "trainer.accelerator=cpu",
                     "data.batch_size=4", "data.seq_len=20", "data.eval_batch_size=2", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                     "++trainer.check_val_every_n_epoch=1",
                     "~callbacks.checkpoint", "+trainer.enable_checkpointing=false", *FAST, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 3
    assert 0 < metrics["valid"]["bpc"] < 10


def test_gpu_script_dry_run_on_cpu_prints_its_table(real_data, tmp_path):
    """`bench/gpu.sh --cpu`: the GPU call's steps end to end at toy sizes, so the script is ready when a GPU is."""
    env = dict(os.environ, CHARLM_DATA_DIR=str(real_data), OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("peak matmul fp32"):]
    assert "course       2x200" in table and "gpu_best short run: completed, 2 epochs, 6 steps" in table
    assert "python train.py experiment=gpu_best trainer.max_epochs=" in table.splitlines()[-1]
    assert json.loads((tmp_path / "gpu_best" / "metrics.json").read_text())["status"] == "completed"
