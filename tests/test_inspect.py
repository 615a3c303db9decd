"""`python -m charlm.inspect`: the page's numbers against charlm.evaluate, its tables and cell strips, its bad
input, and the page itself in a real browser (headless Chromium): shading, guesses on hover and on focus,
no request to anywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm import evaluate, inspect, nets, page, ptb
from charlm.api import Model
from charlm.symbols import kind
from conftest import ROOT, write_tiny_ptb

NETS = {"lstm": (nets.LSTMLM, {"hidden_size": 24}), "mogrifier": (nets.MogrifierLM, {"hidden_size": 16, "rounds": 3, "rank": 4}),
        "gru": (nets.GRULM, {"hidden_size": 16})}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_ptb(tmp_path_factory.mktemp("inspect") / "ptb", repeat=80)


def save_checkpoint(path: Path, name: str, vocab: list[str]) -> Path:
    """A checkpoint as train.py writes its charlm parts, of a seeded untrained network: the page reads any."""
    cls, options = NETS[name]
    torch.manual_seed(0)
    net = cls(len(vocab), **options)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": {},
                "charlm": {"format": 2, "net": {"_target_": nets.target_of(cls), **options}, "vocab": vocab,
                           "symbols": "char"}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory) -> dict[str, Path]:
    vocab = sorted(set(ptb.read_tokens(data / "ptb.char.train.txt")))
    root = tmp_path_factory.mktemp("ckpts")
    return {name: save_checkpoint(root / f"{name}.ckpt", name, vocab) for name in NETS}


def exit_code(main, args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # a CharlmError or argparse's own error
        return e.code


def page_data(path: Path) -> dict:
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S)[1])


@pytest.mark.parametrize("name", list(NETS))
def test_the_pages_mean_is_evaluates_bpc_and_states_give_cell_strips(name, checkpoints, data, tmp_path, capsys):
    ckpt, out = checkpoints[name], tmp_path / "page.html"
    assert inspect.main([str(ckpt), "--data-dir", str(data), "--limit", "400", "--out", str(out)]) == 0
    assert evaluate.main([str(ckpt), "--data-dir", str(data), "--limit", "400", "--output", str(tmp_path / "e.json")]) == 0
    scored = json.loads((tmp_path / "e.json").read_text())
    shown = page_data(out)
    assert len(shown["ids"]) == 400 and len(shown["bits"]) == scored["symbols"] == 399
    assert np.mean(shown["bits"]) == pytest.approx(scored["bpc"], abs=1e-4)
    assert f"mean {scored['bpc']:.4f} bits per char" in out.read_text()  # the page's own summary line
    table = scored["positions"]  # evaluate's where-the-bits-go, over the same symbols
    assert sum(r["symbols"] for r in table) == 399
    assert sum(r["symbols"] * r["mean_bits"] for r in table) / 399 == pytest.approx(scored["bpc"], abs=1e-9)
    assert len(shown["guesses"]) == len(shown["probs"]) == 5 * 399
    html = out.read_text()
    assert "Where the bits go" in html and "word start" in html and "http" not in html.replace("http-equiv", "")
    if name == "gru":  # no cell_states: shading, guesses and the table, no strips
        assert shown["units"] == 0 and shown["tracked"] == [] and "exposes no per-step states" in html
    else:
        hidden = NETS[name][1]["hidden_size"]
        assert shown["units"] == 2 * hidden and len(shown["scales"]) == 2 * hidden
        assert {t["property"] for t in shown["tracked"]} >= {"position in the word", "symbols since the line began"}
        assert f"unit {shown['tracked'][0]['unit']} tracks" in capsys.readouterr().out


def test_cell_states_are_forwards_numbers_with_the_state_inside():
    for name, (cls, options) in NETS.items():
        if name == "gru":
            continue
        torch.manual_seed(0)
        net = cls(7, **options).eval()
        x = torch.randint(0, 7, (3, 11))
        logits, state = net(x)
        stepped, stepped_state, cells = net.cell_states(x)
        assert torch.allclose(stepped, logits, atol=1e-5)
        assert cells.shape == (3, 11, 2 * options["hidden_size"])
        last = torch.cat(state[1] if isinstance(state, tuple) else state["c"], -1)[0]
        assert torch.allclose(cells[:, -1], last, atol=1e-5)  # the last step's cells are the carried c


def test_where_the_bits_go_adds_up_and_names_the_positions():
    symbols = kind("char").split("the cat sat\na N cats 's\n")
    vocab = sorted(set(symbols))
    torch.manual_seed(0)
    reading = inspect.read(Model(nets.LSTMLM(len(vocab), hidden_size=8).eval(), vocab), symbols)
    rows = {r["position"]: r for r in reading.positions}
    assert rows["word start"]["symbols"] == 4 and rows["digit or N"]["symbols"] == 1 and rows["end of line"]["symbols"] == 2
    assert rows["punctuation"]["symbols"] == 1 and rows["word boundary"]["symbols"] == 5
    assert sum(r["symbols"] for r in rows.values()) == len(symbols) - 1
    assert sum(r["share_of_bits"] for r in rows.values()) == pytest.approx(1)
    assert sum(r["mean_bits"] * r["symbols"] for r in rows.values()) == pytest.approx(reading.bits.sum())
    assert [kind("word").position("a", w) for w in ("cat", "N", "<unk>", "<eos>")] == ["word", "N", "<unk>", "end of line"]


def test_the_unit_that_tracks_a_property_is_found():
    symbols = kind("char").split("the cats sat on a mat\nand then N dogs ate\n" * 5)
    facts = inspect.properties(kind("char"), symbols)
    rng = np.random.default_rng(0)
    cells = rng.normal(size=(len(symbols) - 1, 12))
    cells[:, 7] = -facts["position in the word"] + 0.3 * rng.normal(size=len(symbols) - 1)
    cells[:, 2] = facts["symbols since the line began"] / 10 + 0.3 * rng.normal(size=len(symbols) - 1)
    found = {t["property"]: t for t in inspect.tracking_units(cells, facts)}
    assert found["position in the word"]["unit"] == 7 and found["position in the word"]["r"] < -0.8
    assert found["symbols since the line began"]["unit"] == 2
    assert list(facts["position in the word"][:5]) == [1, 2, 3, 0, 1]  # t h e _ c


def test_cells_travel_as_one_signed_byte_per_unit_and_symbol():
    cells = np.array([[0.5, -2.0], [-1.0, 1.0], [0.25, 0.0]])
    encoded, scales = page.cells_payload(cells)
    q = np.frombuffer(__import__("base64").b64decode(encoded), dtype=np.int8).reshape(2, 3)  # unit-major
    assert scales == [1.0, 2.0] and q[0].tolist() == [64, -127, 32] and q[1].tolist() == [-127, 64, 0]


@pytest.mark.parametrize("text, message", [
    ("the cat\nthe Dog sat\n", "line 2, symbol 5: 'D' is not one of the model's"),
    ("  \n", "is empty; give --text a file"),
    (None, "does not exist; pass --text"),
])
def test_bad_text_is_one_line_naming_the_symbol_and_where(text, message, checkpoints, tmp_path, capsys):
    path = tmp_path / "in.txt"
    if text is not None:
        path.write_text(text)
    assert exit_code(inspect.main, [str(checkpoints["lstm"]), "--text", str(path), "--out", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_text("not a checkpoint\n")
    assert exit_code(inspect.main, [str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable charlm checkpoint" in err[0]


def test_a_text_file_is_read_as_the_data_were(checkpoints, tmp_path):
    (tmp_path / "in.txt").write_text("the cat sat on the mat\nthe dog ate\n")
    assert inspect.main([str(checkpoints["lstm"]), "--text", str(tmp_path / "in.txt"), "--out", str(tmp_path / "p.html")]) == 0
    shown = page_data(tmp_path / "p.html")
    names = [shown["names"][i] for i in shown["ids"]]
    assert names[:5] == ["t", "h", "e", "_", "c"] and names.count("<eos>") == 2


# --- in a browser ---------------------------------------------------------------------------------------
def chromium():
    """A headless Chromium under Selenium, logging the page's network events; skipped where the browser
    is absent outside CI (.ci/run installs it)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromedriver (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_the_page_in_a_browser_shades_shows_guesses_and_calls_nowhere(checkpoints, data, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out = tmp_path / "page.html"
    assert inspect.main([str(checkpoints["lstm"]), "--data-dir", str(data), "--limit", "600", "--out", str(out)]) == 0
    browser = chromium()
    try:
        browser.get(out.as_uri())
        spans = browser.find_elements(By.CSS_SELECTOR, "#text .s")
        assert len(spans) == 600
        shades = [s.find_element(By.CSS_SELECTOR, ".c").value_of_css_property("background-color") for s in spans[1:40]]
        assert len(set(shades)) > 5 and all(c.startswith("rgb") for c in shades)  # drawn, each by its surprisal
        tracked = page_data(out)["tracked"]
        assert len(tracked) >= 2 and len(spans[10].find_elements(By.CSS_SELECTOR, ".u")) == len(tracked) + 1  # and the picked unit

        ActionChains(browser).move_to_element(spans[10]).perform()
        tip = browser.find_element(By.ID, "tip")
        assert tip.is_displayed() and len(tip.find_elements(By.CSS_SELECTOR, "tr")) == 5
        assert re.search(r"bits, rank \d+", tip.text)

        spans[0].click()  # keyboard: the arrow moves the focus to the next symbol, and its guesses show
        browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
        assert browser.switch_to.active_element.get_attribute("data-i") == "1"
        assert tip.is_displayed() and len(tip.find_elements(By.CSS_SELECTOR, "tr")) == 5

        artefacts = ROOT / "outputs" / "test-artefacts"
        artefacts.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(artefacts / "inspect-page.png"))

        events = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
        urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
        assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    finally:
        browser.quit()


def test_a_vocabulary_of_fewer_than_five_symbols_shows_them_all():
    model = Model(nets.GRULM(3, hidden_size=8).eval(), list("ab "), "text")
    reading = inspect.read(model, model.symbols("ab ba ab"))
    assert reading.guesses.shape == (7, 3) and reading.cells is None  # a GRU exposes no cell states
    assert '"top":3' in page.render(model, reading, [], "tiny")
