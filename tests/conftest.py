"""Shared fixtures: a tiny PTB-shaped data directory, the real PTB copy, and a `python train.py` runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Two test workers share the cores (pyproject's -n 2): one thread each, for them and the runs they start,
# or torch's threads of the two would spin against each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
TINY_TEXT = "the cat sat on the mat\nthe dog ate the cat\na cat and a dog sat\n"


def write_tiny_ptb(path: Path, repeat: int = 40) -> Path:
    """Character files in PTB's layout (symbols space separated, `_` between words) from a small text."""
    from charlm.ptb import md5sum, words_to_chars

    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", repeat), ("valid", max(2, repeat // 8)), ("test", max(2, repeat // 8))):
        (path / f"ptb.char.{split}.txt").write_text(words_to_chars(TINY_TEXT * n))
    (path / "MD5SUMS").write_text("".join(f"{md5sum(f)}  {f.name}\n" for f in sorted(path.glob("ptb.*.txt"))))
    return path


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_tiny_ptb(tmp_path / "ptb")


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = Path(os.environ.get("CHARLM_DATA_DIR", ROOT.parent / "shared" / "data" / "ptb"))
    if not (path / "ptb.char.train.txt").is_file():
        pytest.skip(f"the real PTB files are not in {path}; set CHARLM_DATA_DIR")
    return path


def run_train(*overrides: str, data_dir: Path | None = None, timeout: float = 300, cwd: Path = ROOT,
              pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """`python train.py overrides...` in a subprocess, as a user would run it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    if data_dir is not None:
        env["CHARLM_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_here(run_dir: Path, *overrides: str, data_dir: Path) -> dict:
    """One run as `python train.py hydra.run.dir=RUN_DIR overrides...` trains it, in this process; returns its
    metrics.json. For tests of what a run gives: a subprocess (run_train) pays seconds of imports, so it is
    kept for what a command line must show (exit codes, one-line errors, signals)."""
    import json

    from charlm.train import fit

    fit(compose_config(f"run_dir={run_dir}", f"paths.data_dir={data_dir}", *overrides))
    return json.loads((run_dir / "metrics.json").read_text())


FAST = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")


def compose_config(*overrides: str, hydra: bool = False):
    """conf/train.yaml composed with `overrides`, as `python train.py overrides...` would (the `hydra` node too
    with hydra=True); run_dir is a placeholder unless an override sets it."""
    from hydra import compose, initialize_config_dir

    from charlm import resolvers

    resolvers.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        if hydra:
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        placeholder = [] if any(o.startswith("run_dir=") for o in overrides) else ["run_dir=unused"]
        return compose(config_name="train", overrides=[*placeholder, *overrides])
