"""The code's own rules: the ML core imports no Hydra (an import-linter contract in pyproject.toml), ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_import_contract_holds():
    out = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_the_core_trains_and_loads_with_hydra_and_omegaconf_unimportable(tmp_path):
    """The contract at run time: a network, the LightningModule, a few steps and charlm.load, with no Hydra."""
    script = """
import sys
sys.modules["hydra"] = sys.modules["omegaconf"] = None  # any import of them fails
import torch, lightning as L
from functools import partial
import charlm
from charlm.data import TextDataModule
from charlm.module import LanguageModel
from charlm.nets import LSTMLM
from charlm.schedules import zaremba
(data := TextDataModule(sys.argv[1], seq_len=8, batch_size=2, eval_batch_size=1)).setup()
net = {"_target_": "charlm.nets.LSTMLM", "hidden_size": 16, "num_layers": 1}  # what charlm.load rebuilds
model = LanguageModel(LSTMLM(len(data.vocab), 16, 1), data.vocab.symbols, data.kind, net_config=net,
                      optimizer=partial(torch.optim.SGD, lr=1.0), scheduler=zaremba)
trainer = L.Trainer(max_steps=3, limit_val_batches=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=sys.argv[2])
trainer.fit(model, datamodule=data)
trainer.save_checkpoint(sys.argv[2] + "/m.ckpt")
print(charlm.load(sys.argv[2] + "/m.ckpt").score("the cat")["bpc"] > 0)
"""
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 40)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.txt"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-3000:]


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "bench", "train.py"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
