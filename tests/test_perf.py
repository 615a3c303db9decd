"""Performance work that must not change behaviour: the token cache, the model's layout, the benchmark's
two loops, and the presets (they compose, and each trains a few steps on CPU)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from charlm import cache, config, nets, ptb
from charlm.data import PTBDataModule
from charlm.nets import LSTMLM
from charlm.nets.dropout import dropout, dropout_masks
from conftest import FAST, ROOT, compose_config, train_here, write_tiny_ptb


# --- the token cache ---------------------------------------------------------------------------------
@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "charlm"


def load(data_dir, **kw):
    dm = PTBDataModule(str(data_dir), download=False, verify=False, **kw)
    dm.setup()
    return dm


def text_files(data_dir):
    return {split: data_dir / ptb.filename("char", split) for split in ptb.SPLITS}


def test_cache_is_written_beside_the_data_and_then_used(tiny_data, user_cache):
    first = load(tiny_data)
    path = tiny_data / "ptb.char.ids.pt"
    assert path.is_file() and not user_cache.exists()
    written = path.stat()
    second = load(tiny_data)
    assert second.vocab == first.vocab
    assert all(torch.equal(second.ids[s], first.ids[s]) and second.ids[s].dtype == torch.long for s in first.ids)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # not rewritten
    # What loads is the cache, not the text: a cache of other splits, keyed on these very text files, is taken.
    path.unlink()
    n = len(first.vocab)
    other = first.vocab.symbols[::-1], {s: n - 1 - ids for s, ids in first.ids.items()}
    cache.load_or_build(text_files(tiny_data), tiny_data, "char", lambda: other)
    third = load(tiny_data)
    assert third.vocab.symbols == other[0] and all(torch.equal(third.ids[s], other[1][s]) for s in first.ids)


def test_changed_text_rebuilds_the_cache(tiny_data, user_cache):
    before = load(tiny_data)
    train = tiny_data / "ptb.char.train.txt"
    train.write_text("z _ " + train.read_text())  # a new first symbol: new vocabulary order and ids
    after = load(tiny_data)
    assert after.vocab.symbols[0] == "z" and after.vocab != before.vocab
    assert after.ids["train"].numel() == before.ids["train"].numel() + 2
    assert load(tiny_data, cache=False).vocab == after.vocab  # what the text files say


@pytest.mark.parametrize("damage", ["garbage", "truncated", "altered ids"])
def test_damaged_cache_is_rebuilt_not_trusted(tiny_data, user_cache, damage):
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
    # the rebuilt cache is whole: the cache takes it without reading the text files
    symbols, _ = cache.load_or_build(text_files(tiny_data), tiny_data, "char",
                                     lambda: pytest.fail("the rebuilt cache was not used"))
    assert symbols == good.vocab.symbols


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
def test_time_major_model_equals_a_batch_first_lstm_without_dropout():
    """The network runs time-major inside, one layer at a time; its API and results are those of one
    batch_first multi-layer LSTM, whose checkpoints it also loads."""
    ref = nn.LSTM(16, 16, 2, batch_first=True)
    net = LSTMLM(11, 16, 2, dropout=0.3)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("lstm.")}
    net.load_state_dict({**state, **{f"lstm.{k}": v for k, v in ref.state_dict().items()}})  # the old layout
    net.eval()
    x = torch.randint(0, 11, (4, 7))
    logits, (h, c) = net(x)
    out, (h_ref, c_ref) = ref(net.embed(x))
    assert logits.shape == (4, 7, 11)
    torch.testing.assert_close(logits, net.decoder(out))
    torch.testing.assert_close((torch.cat(h), torch.cat(c)), (h_ref, c_ref))


def test_training_draws_the_dropout_masks_in_order_embedding_between_layers_output():
    torch.manual_seed(0)
    net = LSTMLM(11, 16, 2, dropout=0.3).train()
    x, h0, c0 = torch.randint(0, 11, (4, 7)), torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    torch.manual_seed(1)
    logits, (h, c) = net(x, ((h0[:1], h0[1:]), (c0[:1], c0[1:])))
    torch.manual_seed(1)
    out = dropout(net.embed(x.t()), 0.3)
    out, (h1, c1) = net.lstm[0](out, (h0[:1], c0[:1]))
    out, (h2, c2) = net.lstm[1](dropout(out, 0.3), (h0[1:], c0[1:]))
    torch.testing.assert_close(logits, net.decoder(dropout(out, 0.3)).transpose(0, 1))
    torch.testing.assert_close((h, c), ((h1, h2), (c1, c2)))


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
    masks = torch.stack(dropout_masks(x, [x.shape] * 3, [0.2] * 3))
    torch.manual_seed(3)
    assert masks.shape == (3, 10, 6, 8) and torch.equal(masks, torch.stack([dropout(x, 0.2) for _ in range(3)]))
    assert [m.shape for m in dropout_masks(x, [(7,)] * 3, [0.5] * 3)] == [(7,)] * 3  # not a multiple of four


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


FAULTS_PER_STEP = """
import resource, sys
sys.path.insert(0, {tests!r})
from conftest import compose_config
from charlm.train import build
cfg = compose_config("model.hidden_size=512", "cpu.keep_freed_memory=" + sys.argv[1])
datamodule, model, _ = build(cfg)
optimizer = model.optimizer(model.named_parameters())
for i, batch in enumerate(datamodule.train_dataloader()):
    if i == 10:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if i == 40:
        break
    model.training_step(batch, i).backward()
    optimizer.step()
    optimizer.zero_grad()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 30)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_is_not_faulted_in_again_each_step(real_data):
    """At 2x512 glibc's defaults fault thousands of pages back in every training step (weight gradients,
    oneDNN's workspaces); with cpu.keep_freed_memory the steps reuse them. Each in a fresh process, with
    training's two threads (one thread's workspaces can fit glibc's defaults)."""
    def faults_per_step(on: bool) -> float:
        proc = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP.format(tests=str(ROOT / "tests")),
                               str(on).lower()], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, CHARLM_DATA_DIR=str(real_data), OMP_NUM_THREADS="2"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(proc.stdout.split()[-1])

    assert faults_per_step(True) < 100 < 1000 < faults_per_step(False)


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

    project, trainer, cfg, datamodule = fit(["trainer.enable_progress_bar=false"], tmp_path / "project")
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


# --- what the speed tricks buy (--tricks) ---------------------------------------------------------------
def test_trick_costs_time_the_dropout_masks_a_training_step_draws():
    """--tricks times dropout_masks on the shapes and rates it derives from the config: drawn from the same
    seed and applied where the network applies its masks, they give the network's training logits."""
    bench = load_bench("throughput")
    cfg = compose_config("model.hidden_size=12", "model.num_layers=3", "model.dropout=0.3")
    net = nets.build(OmegaConf.to_container(cfg.model), 11).train()
    x = torch.randint(0, 11, (4, 7))
    shapes, ps = bench.step_masks(cfg.model, 4, 7)
    assert shapes == [(7, 4, 12)] * 4 and ps == [0.3] * 4
    torch.manual_seed(1)
    logits, _ = net(x)
    torch.manual_seed(1)
    masks = dropout_masks(net.embed.weight, shapes, ps)
    out = net.embed(x.t()) * masks[0]
    for layer, mask in zip(net.lstm, masks[1:]):
        out = layer(out)[0] * mask
    torch.testing.assert_close(logits, net.decoder(out).transpose(0, 1))
    assert bench.step_masks(compose_config("model.dropout=0").model, 4, 7) == ([], [])
    with pytest.raises(ValueError, match="model.dropout"):
        bench.step_masks(compose_config("model.locked_dropout=true").model, 4, 7)


def test_trick_costs_leave_the_training_alone_and_give_each_tricks_gain(real_data, tmp_path):
    """The costs run trains as the project does (the gradients it clips are put back; no dropout here, so no
    mask draw moves the generator), times every trick TrickCosts covers, and the gains are project / without."""
    bench = load_bench("throughput")
    overrides = ["model.dropout=0", "model.hidden_size=32", f"data.data_dir={real_data}",
                 "trainer.gradient_clip_val=0.05"]  # small enough to clip every step
    steps, warmup = 6, 2

    class Losses(bench.L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    plain, timed = Losses(), Losses()
    bench.fit_project(overrides, steps, warmup, "cpu", str(tmp_path / "plain"), (plain,))
    costs = bench.TrickCosts(bench.compose_config(overrides, "unused").model, warmup, "cpu")
    bench.fit_project(overrides, steps, warmup, "cpu", str(tmp_path / "costs"), (timed, costs))
    assert len(plain.values) == warmup + steps and timed.values == plain.values
    timed_tricks = [t for t in bench.TRICKS if t not in bench.SWITCHED_OFF]
    assert list(costs.extra) == timed_tricks and costs.chars == steps * 20 * 10
    assert costs.extra["self.log on logging steps only"] > 0  # every step here is not a logging step
    cps = {"project": [1000.0, 3000.0, 2000.0], "without keep_freed_memory": [800.0, 3000.0, 1000.0]}
    gains = bench.trick_gains(cps, [dict.fromkeys(timed_tricks, 1e-4)] * 3)
    assert gains == pytest.approx({**dict.fromkeys(timed_tricks, 1.2), "keep_freed_memory": 1.25})


# --- presets -------------------------------------------------------------------------------------------
def test_presets_compose_within_their_budgets():
    fast = compose_config("experiment=fast_2x200")
    course = compose_config()
    assert (fast.model.hidden_size, fast.model.num_layers) == (course.model.hidden_size, course.model.num_layers)
    assert fast.trainer.max_epochs <= course.trainer.max_epochs
    hour = compose_config("experiment=cpu_hour")
    days, hours, minutes, seconds = map(int, hour.trainer.max_time.split(":"))
    assert (days, hours * 60 + minutes + seconds / 60) <= (0, 60)
    gpu = compose_config("experiment=gpu_best")
    assert (gpu.model.num_layers, gpu.model.hidden_size) == (3, 1000) and gpu.trainer.max_time
    for cfg in (fast, hour, gpu):
        config.check(cfg)
        assert cfg.scheduler._target_ in ("charlm.schedules.one_cycle", "charlm.schedules.one_cycle_budget")


# gpu_best (3 x 1000) takes ~45 s of a 2-core CPU without bf16 units: with -m slow
@pytest.mark.parametrize("preset", ["fast_2x200", "cpu_hour", pytest.param("gpu_best", marks=pytest.mark.slow)])
def test_preset_trains_a_few_steps_on_cpu(preset, tiny_data, tmp_path):
    metrics = train_here(tmp_path / "run", f"experiment={preset}", "trainer.accelerator=cpu",
                         "data.batch_size=4", "data.seq_len=20", "data.eval_batch_size=2", "trainer.max_epochs=1",
                         "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                         "++trainer.check_val_every_n_epoch=1",
                         "~callbacks.checkpoint", "~callbacks.last_checkpoint", "+trainer.enable_checkpointing=false",
                         *FAST, data_dir=tiny_data)
    assert metrics["status"] == "completed" and metrics["steps"] == 3
    assert 0 < metrics["valid"]["bpc"] < 10


@pytest.mark.slow  # ~3 minutes of a 2-core CPU without bf16 units (it trains gpu_best's 3 x 1000)
def test_gpu_script_dry_run_on_cpu_prints_its_table(real_data, tmp_path):
    """`bench/gpu.sh --cpu`: the GPU call's steps end to end at toy sizes, so the script is ready when a GPU is."""
    env = dict(os.environ, CHARLM_DATA_DIR=str(real_data), OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("peak matmul fp32"):]
    assert "course       2x200" in table
    assert table.splitlines()[-1].startswith("gpu_best with a time budget: completed, 6 steps in ")
    assert json.loads((tmp_path / "gpu_best" / "metrics.json").read_text())["status"] == "completed"
