"""A trained checkpoint used on its own: evaluate, the course's query protocol, sampling, dynamic
evaluation, the Python API, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import charlm
from charlm import api, evaluate, ptb, query, sample
from charlm.errors import CharlmError
from charlm.nets import LSTMLM
from charlm.ptb import words_to_chars
from charlm.symbols import kind
from conftest import FAST, ROOT, TINY_TEXT, train_here, write_tiny_ptb

LONG_TEXT = TINY_TEXT * 300  # ~19k symbols: the "slice" the batch-size comparison scores


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A small model trained by `python train.py` on the tiny text (one epoch, ~1.1 valid bpc)."""
    root = tmp_path_factory.mktemp("evaluate")
    data = write_tiny_ptb(root / "ptb", repeat=200)
    train_here(root / "run", "data.batch_size=8", "data.eval_batch_size=4", "data.seq_len=20", "model.hidden_size=32",
               "optimizer=adamw", "optimizer.lr=0.01", "scheduler=none", "trainer.max_epochs=1", *FAST, data_dir=data)
    long = root / "long"
    long.mkdir()
    (long / "ptb.char.valid.txt").write_text(words_to_chars(LONG_TEXT))
    ckpt = root / "run" / "checkpoints" / "best.ckpt"
    return SimpleNamespace(ckpt=ckpt, data=data, long=long, run=root / "run", model=charlm.load(ckpt))


def tool(module: str, *args: str, **kwargs) -> subprocess.Popen:
    """`python -m charlm.<module> args...` in a subprocess, this checkout's sources first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", f"charlm.{module}", *args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def valid_symbols(data_dir: Path) -> list[str]:
    return ptb.read_tokens(data_dir / "ptb.char.valid.txt")


# --- the query protocol ------------------------------------------------------------------------------
def test_query_protocol_through_a_pipe(trained):
    proc = tool("query", str(trained.ckpt))
    watchdog = threading.Timer(120, proc.kill)  # a missing flush would hang readline: fail instead
    watchdog.start()
    try:
        def ask(symbol: str) -> str:  # one line out, one answer back, before the next line is written
            proc.stdin.write(symbol + "\n")
            proc.stdin.flush()
            return proc.stdout.readline()

        assert proc.stdout.readline() == "OK GO\n"
        vocab = trained.model.vocab.symbols
        answers = {}
        for history in (["t", "h", "e", "_"], ["a", "_"]):  # `_` after different histories
            for symbol in history:
                line = ask(symbol)
            answers[tuple(history)] = [float(v) for v in line.split(" ")]
        for logp in answers.values():
            assert len(logp) == len(vocab)
            assert abs(sum(math.exp(v) for v in logp) - 1) < 1e-4
        first, second = answers.values()
        assert max(abs(a - b) for a, b in zip(first, second)) > 1e-3  # the state is carried
        assert ask("Z").startswith("error: unknown symbol 'Z'")
        after_error = [float(v) for v in ask("c").split(" ")]
        proc.stdin.close()
        assert proc.stdout.read() == ""  # nothing else on stdout
        assert proc.wait(timeout=60) == 0  # end of input ends it cleanly
        assert "Traceback" not in proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    # the answer after the error is the one the history without the bad line gives
    state = None
    for symbol in ["t", "h", "e", "_", "a", "_", "c"]:
        logp, state = trained.model.next_logprobs(state, symbol)
    assert after_error == pytest.approx(logp.tolist(), abs=2e-6)


def test_query_nll_equals_evaluate_nll(trained, tmp_path):
    symbols = valid_symbols(trained.data)
    proc = tool("query", str(trained.ckpt))
    out, err = proc.communicate("\n".join(symbols) + "\n", timeout=120)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "OK GO" and len(lines) == len(symbols) + 1
    index = trained.model.vocab.index
    nll = -sum(float(line.split(" ")[index[nxt]]) for line, nxt in zip(lines[1:], symbols[1:])) / (len(symbols) - 1)
    assert evaluate.main([str(trained.ckpt), "--data-dir", str(trained.data), "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["symbols"] == len(symbols) - 1
    assert abs(result["nll"] - nll) < 1e-4


# --- evaluate ----------------------------------------------------------------------------------------
def test_evaluate_batch_1_and_batch_n_agree_on_a_slice(trained, tmp_path, capsys):
    results = {}
    for batch in (1, 8):
        out = tmp_path / f"b{batch}.json"
        assert evaluate.main([str(trained.ckpt), "--data-dir", str(trained.long), "--batch-size", str(batch),
                              "--limit", "16000", "--output", str(out)]) == 0
        results[batch] = json.loads(out.read_text())
    assert results[1]["symbols"] == 15999 and results[8]["symbols"] == 8 * (2000 - 1)
    assert results[1]["bpc"] != results[8]["bpc"]
    assert abs(results[1]["bpc"] - results[8]["bpc"]) < 0.01
    assert results[1]["ppl56"] == pytest.approx(math.exp(5.6 * results[1]["nll"]), rel=1e-9)
    assert "bpc" in capsys.readouterr().out


def test_evaluate_at_the_training_batch_size_reproduces_training_validation(trained, tmp_path):
    out = tmp_path / "e.json"
    assert evaluate.main([str(trained.ckpt), "--data-dir", str(trained.data), "--batch-size", "4",
                          "--output", str(out)]) == 0
    logged = json.loads((trained.run / "metrics.json").read_text())["valid"]
    assert json.loads(out.read_text())["nll"] == pytest.approx(logged["nll"], abs=1e-5)


def test_evaluate_finds_the_data_the_run_trained_on_without_being_told(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("CHARLM_DATA_DIR", raising=False)  # the run's data directory, not the environment's now
    assert json.loads((trained.run / "metrics.json").read_text())["data_dir"] == str(trained.data.resolve())
    assert evaluate.main([str(trained.ckpt), "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["symbols"] == len(valid_symbols(trained.data)) - 1


def test_evaluate_writes_json_beside_the_checkpoint_by_default(trained, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(trained.ckpt.read_bytes())
    assert evaluate.main([str(ckpt), "--data-dir", str(trained.data), "--split", "test"]) == 0
    assert json.loads((tmp_path / "model.test.b1.json").read_text())["split"] == "test"


def test_score_is_the_same_in_one_chunk_or_many_and_step_by_step(trained):
    model, text = trained.model, LONG_TEXT[:600]
    whole = model.score(text)["nll"]
    assert model.score(text, max_chunk=7)["nll"] == pytest.approx(whole, abs=1e-6)
    symbols, state, total = model.symbols(text), None, 0.0
    for symbol, nxt in zip(symbols, symbols[1:]):
        logp, state = model.next_logprobs(state, symbol)
        total -= float(logp[model.vocab.index[nxt]])
    assert total / (len(symbols) - 1) == pytest.approx(whole, abs=1e-5)


def test_steps_follow_weights_changed_in_place(trained):
    torch.manual_seed(0)
    net = LSTMLM(len(trained.model.vocab), hidden_size=8, num_layers=2, init_range=0.5)
    model = api.Model(net, trained.model.vocab)
    before, _ = model.next_logprobs(None, "t")
    with torch.no_grad():
        net.embed.weight.normal_(0, 1)  # in place, as an optimizer step does between two validation samples
    after, _ = model.next_logprobs(None, "t")
    assert (before - after).abs().max() > 1e-2
    assert torch.allclose(after, api.Model(net, trained.model.vocab).next_logprobs(None, "t")[0])
    logits, _ = net.eval()(torch.tensor([[trained.model.vocab.index["t"]]]))
    assert torch.allclose(after, torch.log_softmax(logits[0, -1], -1), atol=1e-6)


def test_dynamic_evaluation_lowers_nll_on_a_repetitive_text(trained):
    model = trained.model
    text = "a mat ate the dog on a cat\n" * 30  # a sentence the training text never had, repeated
    static = model.score(text)["nll"]
    dynamic = model.score(text, dynamic=api.Dynamic(lr=0.1, segment_len=20))["nll"]
    assert dynamic < static - 0.05
    assert model.score(text)["nll"] == static  # the adapted weights were a copy
    pulled_back = model.score(text, dynamic=api.Dynamic(lr=0.1, segment_len=20, decay=0.5))["nll"]
    assert dynamic < pulled_back < static


def test_evaluate_dynamic_option(trained, tmp_path):
    out = tmp_path / "d.json"
    assert evaluate.main([str(trained.ckpt), "--data-dir", str(trained.data), "--dynamic", "--dynamic-lr", "0.01",
                          "--segment-len", "10", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dynamic"] == {"lr": 0.01, "segment_len": 10, "decay": 0.0}
    assert result["nll"] != trained.model.score(valid_symbols(trained.data))["nll"]


# --- sampling ----------------------------------------------------------------------------------------
def test_sample_is_reproducible_with_a_seed(trained, capsys):
    model = trained.model
    one = model.sample("the cat", length=80, temperature=0.8, seed=1)
    assert one.startswith("the cat") and one == model.sample("the cat", length=80, temperature=0.8, seed=1)
    assert one != model.sample("the cat", length=80, temperature=0.8, seed=2)
    assert model.sample("the cat", 40, greedy=True) == model.sample("the cat", 40, greedy=True, seed=7)
    state = torch.random.get_rng_state()
    model.sample(length=20, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random stream is untouched
    assert sample.main([str(trained.ckpt), "--prime", "the cat", "--length", "80", "--temperature", "0.8",
                        "--seed", "1"]) == 0
    assert capsys.readouterr().out == one + "\n"


def tensorboard_texts(run: Path, prefix: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = []
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        texts += [t.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"] if tag.startswith(prefix)
                  for t in acc.Tensors(tag)]
    return texts


def test_training_logs_a_text_sample_each_validation_epoch(trained):
    texts = tensorboard_texts(trained.run, "valid/sample")
    assert len(texts) == 1  # one validation epoch; none for the sanity check
    assert len(texts[0].strip()) > 50


def test_training_logs_where_the_bits_go_at_each_validation_and_they_add_up(trained):
    tables = tensorboard_texts(trained.run, "valid/bits_by_position")
    assert len(tables) == 1 and "| word start |" in tables[0] and "| word boundary |" in tables[0]
    rows = [line.strip("|").split("|") for line in tables[0].splitlines()[2:]]
    symbols = sum(int(r[1].replace(",", "")) for r in rows)
    valid = json.loads((trained.run / "metrics.json").read_text())
    mean = sum(int(r[1].replace(",", "")) * float(r[3]) for r in rows) / symbols  # symbol-weighted mean bits
    assert mean == pytest.approx(valid["valid"]["bpc"], abs=2e-3)  # table rounding, 3 decimals


# --- the API -----------------------------------------------------------------------------------------
def test_symbols_and_text_at_both_levels():
    char, word, text = kind("char"), kind("word"), kind("text")
    chars = char.split("the cat\na  dog")
    assert chars == ["t", "h", "e", "_", "c", "a", "t", "<eos>", "a", "_", "d", "o", "g"]
    assert char.join(chars) == "the cat\na dog"
    assert ptb.tokenize(words_to_chars(" the cat \n")) == char.split("the cat\n")  # as the files spell it
    words = word.split("the cat\na dog <eos> it")
    assert words == ["the", "cat", "<eos>", "a", "dog", "<eos>", "it"]
    assert word.join(words) == "the cat\na dog\nit"
    assert text.split("a b\n") == ["a", " ", "b", "\n"] and text.join(["a", " ", "b"]) == "a b"
    assert (char.headline, word.headline, text.headline) == ("bpc", "ppl", "bpc")
    assert set(char.figures(1.0)) == {"nll", "bpc", "ppl", "ppl56"} and set(word.figures(1.0)) == {"nll", "ppl"}


def test_load_gives_vocab_score_next_logprobs_sample(trained):
    model = charlm.load(trained.ckpt)
    assert model.vocab.symbols == json.loads((trained.run / "vocab.json").read_text())
    scores = model.score("the cat sat on the mat")
    assert set(scores) == {"nll", "bpc", "ppl", "ppl56", "symbols"} and scores["symbols"] == 21
    logp, state = model.next_logprobs(None, "t")
    assert logp.shape == (len(model.vocab),) and torch.exp(logp).sum() == pytest.approx(1, abs=1e-5)
    with pytest.raises(CharlmError, match="unknown symbol 'Q'"):
        model.next_logprobs(state, "Q")


def test_word_level_checkpoints_read_and_write_words(trained):
    words = ["the", "cat", "sat", "<eos>", "a", "dog"]
    net = LSTMLM(len(words), hidden_size=8, num_layers=1)
    model = api.Model(net, words, "word")
    assert model.kind.name == "word"
    assert model.sample("the cat", length=5, seed=0).startswith("the cat ")
    assert model.score("the cat sat\na dog")["symbols"] == 5


# --- bad input ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bad_files(trained, tmp_path_factory) -> Path:
    bad = tmp_path_factory.mktemp("bad")
    data = trained.ckpt.read_bytes()
    (bad / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, bad / "other.ckpt")
    (bad / "text.ckpt").write_text("not a checkpoint\n")
    ckpt = torch.load(trained.ckpt, weights_only=True)
    ckpt["charlm"]["net"]["hidden_size"] += 1
    torch.save(ckpt, bad / "mismatch.ckpt")
    (bad / "empty").mkdir()
    return bad


@pytest.mark.parametrize("tool_main, args, message", [
    (evaluate.main, ["{bad}/missing.ckpt"], "missing.ckpt does not exist"),
    (evaluate.main, ["{bad}/truncated.ckpt"], "is not a readable charlm checkpoint"),
    (query.main, ["{bad}/text.ckpt"], "is not a readable charlm checkpoint"),
    (sample.main, ["{bad}/other.ckpt"], "is not a charlm checkpoint"),
    (sample.main, ["{bad}/mismatch.ckpt"], "weights do not fit the network"),
    (evaluate.main, ["{bad}"], "is a directory"),
    (sample.main, ["{ckpt}", "--prime", "The Cat QQ"], "lacks: 'T', 'C', 'Q'"),
    (evaluate.main, ["{ckpt}", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
    (evaluate.main, ["{ckpt}", "--data-dir", "{bad}/empty"], "empty/ptb.char.valid.txt does not exist; pass --data-dir"),
    (evaluate.main, ["{ckpt}", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    (evaluate.main, ["{ckpt}", "--batch-size", "2000", "--data-dir", "{data}"], "too few to score at batch size 2000"),
    (sample.main, ["{ckpt}", "--temperature", "0"], "--temperature: 0 is out of range"),
])
def test_bad_input_is_one_error_line(tool_main, args, message, trained, bad_files, capsys):
    args = [a.format(bad=bad_files, ckpt=trained.ckpt, data=trained.data) for a in args]
    try:
        rc = tool_main(args)
    except SystemExit as e:  # argparse's own errors exit from parse_args
        rc = e.code
    assert rc == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_bad_checkpoint_in_a_subprocess_exits_2_without_traceback(bad_files):
    proc = tool("query", str(bad_files / "truncated.ckpt"))
    out, err = proc.communicate("a\n", timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- the documented numbers on a real checkpoint (slow; CHARLM_CKPT=path) ------------------------------
@pytest.mark.slow
def test_query_on_the_whole_valid_split_matches_evaluate_and_is_fast(real_data, tmp_path):
    ckpt = os.environ.get("CHARLM_CKPT")
    if not ckpt:
        pytest.skip("set CHARLM_CKPT to a trained checkpoint")
    symbols = ptb.read_tokens(real_data / "ptb.char.valid.txt")
    proc = tool("query", ckpt)
    assert proc.stdout.readline() == "OK GO\n"
    start = time.perf_counter()  # lock-step, as a grader asks: one line out, wait for its answer
    lockstep = 5000
    for symbol in symbols[:lockstep]:
        proc.stdin.write(symbol + "\n")
        proc.stdin.flush()
        proc.stdout.readline()
    lockstep_rate = lockstep / (time.perf_counter() - start)
    proc.stdin.close()
    proc.wait()
    proc = tool("query", ckpt)
    assert proc.stdout.readline() == "OK GO\n"
    start = time.perf_counter()  # streamed: the whole split written into the pipe at once
    out, err = proc.communicate("\n".join(symbols) + "\n", timeout=1800)
    rate = len(symbols) / (time.perf_counter() - start)
    assert proc.returncode == 0, err
    index = charlm.load(ckpt).vocab.index
    lines = out.splitlines()
    nll = -sum(float(line.split(" ")[index[nxt]]) for line, nxt in zip(lines, symbols[1:])) / (len(symbols) - 1)
    assert evaluate.main([ckpt, "--data-dir", str(real_data), "--output", str(tmp_path / "e.json")]) == 0
    expected = json.loads((tmp_path / "e.json").read_text())["nll"]
    print(f"\nquery: {len(symbols)} symbols streamed at {rate:.0f} symbols/s, {lockstep} in lock-step at "
          f"{lockstep_rate:.0f} symbols/s; mean nll {nll:.6f}, evaluate --batch-size 1 {expected:.6f}")
    assert abs(nll - expected) < 1e-4 and min(rate, lockstep_rate) >= 2000
