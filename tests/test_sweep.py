"""Multiruns: one directory, TensorBoard run and metrics.json per job, the sweep's report, failed jobs, launchers."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import FAST, ROOT, compose_config, run_train

TINY = ("data.batch_size=4", "data.eval_batch_size=2", "model.hidden_size=16", *FAST)
PNG = b"\x89PNG\r\n\x1a\n"


def read_summary(sweep):
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_gives_every_job_its_own_run_and_writes_the_report(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", f"hydra.sweep.dir={sweep}", "data.seq_len=5,10", "model.dropout=0,0.3",
                     "trainer.max_epochs=2", *TINY, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/.hydra"))
    assert len(jobs) == 4
    combos = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["run_dir"] == str(job)
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        combos.add((cfg.data.seq_len, cfg.model.dropout))
    assert combos == {(5, 0), (5, 0.3), (10, 0), (10, 0.3)}

    rows = read_summary(sweep)
    assert [int(r["job"]) for r in rows] == [0, 1, 2, 3]
    for row in rows:
        metrics = json.loads((Path(row["dir"]) / "metrics.json").read_text())
        assert row["status"] == "completed"
        assert float(row["best_valid_bpc"]) == pytest.approx(metrics["best_valid_bpc"], rel=1e-12)
        assert float(row["test_bpc"]) == pytest.approx(metrics["test"]["bpc"], rel=1e-12)
        assert float(row["test_ppl56"]) == pytest.approx(metrics["test"]["ppl56"], rel=1e-12)
        assert int(row["epochs"]) == 2 and float(row["wall_time_s"]) == metrics["wall_time_s"]
    md = (sweep / "summary.md").read_text()
    assert md.count("| completed |") == 4 and "data.seq_len=10 model.dropout=0.3" in md
    for png in ("valid_bpc.png", "learning_curves.png"):
        assert (sweep / png).read_bytes()[:8] == PNG and f"({png})" in md
    assert json.loads((sweep / "sweep.json").read_text())["wall_time_s"] > 0


def test_failed_jobs_do_not_sink_the_sweep(tiny_data, tmp_path):
    """A bad value (seq_len 0), a divergence (lr 1e30) and an exception inside Lightning (precision bogus)
    each fail their own job only; the other jobs run and the report lists every job."""
    sweep = tmp_path / "sweep"
    proc = run_train("-m", f"hydra.sweep.dir={sweep}", "data.seq_len=0,5", "optimizer.lr=1,1e30",
                     "trainer.precision=32-true,bogus", "trainer.max_epochs=1", *TINY, data_dir=tiny_data)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the exit status says a job failed
    rows = {}
    for r in read_summary(sweep):
        o = dict(kv.split("=", 1) for kv in r["overrides"].split())
        rows[int(o["data.seq_len"]), float(o["optimizer.lr"]), o["trainer.precision"]] = r
    assert len(rows) == 8
    ok = rows[5, 1, "32-true"]
    assert ok["status"] == "completed" and math.isfinite(float(ok["best_valid_bpc"]))
    diverged = rows[5, 1e30, "32-true"]
    assert diverged["status"] == "failed" and "diverged" in diverged["reason"]  # in training, or by the report
    for (seq_len, _, precision), row in rows.items():
        if seq_len == 0:
            assert row["status"] == "failed" and "data.seq_len=0 is out of range" in row["reason"]
        elif precision == "bogus":
            assert row["status"] == "failed" and "bogus" in row["reason"]
    for job in sweep.glob("*/.hydra"):  # every job has a metrics.json saying how it ended
        assert json.loads((job.parent / "metrics.json").read_text())["status"] in ("completed", "failed")
    assert "1 completed, 7 failed" in (sweep / "summary.md").read_text()


def test_report_command_rewrites_the_summary(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    assert run_train("-m", f"hydra.sweep.dir={sweep}", "data.seq_len=5,10", "trainer.max_epochs=1", *TINY,
                     data_dir=tiny_data).returncode == 0
    before = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    (sweep / "valid_bpc.png").unlink()
    proc = subprocess.run([sys.executable, "-m", "charlm.report", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "summary.csv").read_text() == before and (sweep / "valid_bpc.png").is_file()
    assert "| completed |" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "charlm.report", str(tmp_path / "nothing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_ddp_job_in_a_local_sweep_fails_clearly(tiny_data, tmp_path):
    """Lightning would start DDP's second rank by re-running the command line, `-m` included."""
    sweep = tmp_path / "sweep"
    proc = run_train("-m", f"hydra.sweep.dir={sweep}", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                     "data.seq_len=5,10", *TINY, data_dir=tiny_data)
    assert proc.returncode == 1
    rows = read_summary(sweep)
    assert len(rows) == 2 and all("a sweep job runs on one device" in r["reason"] for r in rows)


def test_experiment_is_the_reports_grid():
    cfg = compose_config("experiment=seq_dropout_grid", hydra=True)
    params = cfg.hydra.sweeper.params
    assert [int(v) for v in params["data.seq_len"].split(",")] == [5, 10, 20, 50]
    assert [float(v) for v in params["model.dropout"].split(",")] == [0, 0.2, 0.5]
    assert cfg.trainer.max_epochs == compose_config().trainer.max_epochs == 2  # the report's budget
    assert cfg.data.batch_size == 20 and cfg.model.hidden_size == 200


def test_slurm_launcher_asks_for_one_gpu_per_job(tmp_path, monkeypatch):
    """Without SLURM: run the launcher up to sbatch, a stand-in on PATH that keeps the job-array script it is
    given and refuses it (submitit looks for srun on PATH to know it is on a SLURM cluster: a stand-in too)."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "kept"
    bin_dir.mkdir()
    kept.mkdir()
    for name, body in {"srun": "exit 1", "sbatch": f'cp "$1" {kept}/\necho "not submitted" >&2\nexit 1'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_config("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", "hydra.launcher.partition=gpu", hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(RuntimeError, match="not submitted"):
        launcher.launch([["data.seq_len=5"], ["data.seq_len=50"]], initial_job_idx=0)
    (script,) = [path.read_text() for path in kept.iterdir()]
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1", "--array=0-1%2", "--partition=gpu",
                 "--time=240", f"--output={tmp_path}/.submitit/"):
        assert f"#SBATCH {line}" in script
    assert "srun" in script and "submitit.core._submit" in script


def test_a_slurm_preemption_checkpoints_the_job_and_requeues_it_through_scontrol(tmp_path, monkeypatch):
    """SLURM's side of submitit's pre-emption path: the signal SLURM sends (USR2) to a job of
    hydra/launcher=slurm checkpoints the job with its own overrides (so the requeued job finds its directory
    and last.ckpt: the test below) and calls `scontrol requeue $SLURM_JOB_ID`, a stand-in here that records it."""
    import signal

    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.slurm.slurm import SlurmJobEnvironment

    calls, scontrol = tmp_path / "scontrol.calls", tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    job = DelayedSubmission(launcher, ["data.seq_len=5"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    job.set_timeout(cfg.hydra.launcher.timeout_min, cfg.hydra.launcher.max_num_timeout)
    paths = JobPaths(tmp_path / ".submitit", job_id="4242")
    paths.folder.mkdir()
    with pytest.raises(SystemExit):  # the job exits; SLURM starts it again from the pickle
        SignalHandler(SlurmJobEnvironment(), paths, job).checkpoint_and_try_requeue(signal.SIGUSR2)
    assert calls.read_text().split() == ["requeue", "4242"]
    requeued = DelayedSubmission.load(paths.submitted_pickle)
    assert requeued.args[:3] == (["data.seq_len=5"], "hydra.sweep.dir", 0)  # the same job, the same directory
    assert requeued._timeout_countdown == cfg.hydra.launcher.max_num_timeout  # a pre-emption is not a timeout


def submitit_job_pid(sweep: Path) -> int | None:
    """The process running a submitit job of `sweep` on this machine (submitit.core._submit <its folder>)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and any(str(sweep).encode() in part for part in cmdline):
            return int(proc.name)
    return None


@pytest.mark.slow  # the signal can miss the job beside another test worker: run with -m slow
def test_a_preempted_submitit_job_is_requeued_and_resumes_to_the_same_result(tmp_path):
    """The same submitit path as SLURM (pickled job, worker process, results, requeue), on this machine: the
    job gets the pre-emption signal SLURM sends (USR2), submitit requeues it, and the restarted job resumes
    from its own last step checkpoint to the uninterrupted run's result."""
    import signal
    import time

    from conftest import write_tiny_ptb

    data = write_tiny_ptb(tmp_path / "ptb", repeat=1200)  # ~1,800 windows: time to signal it mid-epoch
    sweep = tmp_path / "sweep"
    common = ("trainer.max_epochs=1", "data.seq_len=10", *TINY)
    env = dict(os.environ, CHARLM_DATA_DIR=str(data), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                             "hydra.launcher.gpus_per_node=0", f"hydra.sweep.dir={sweep}",
                             "sweep.every_n_train_steps=50", *common], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(sweep.glob("*/checkpoints/step.ckpt")) or (pid := submitit_job_pid(sweep)) is None:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.01)
    os.kill(pid, signal.SIGUSR2)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    proc.stderr.close()
    (job,) = [d.parent for d in sweep.glob("*/.hydra")]
    log = (job / "train.log").read_text()
    assert "resuming the interrupted job" in log
    assert "Caught signal SIGUSR2" in "".join(p.read_text() for p in sweep.glob(".submitit/*/*.err"))
    single = run_train(f"hydra.run.dir={tmp_path / 'single'}", *common, data_dir=data)
    assert single.returncode == 0, single.stderr[-2000:]
    expected = json.loads((tmp_path / "single" / "metrics.json").read_text())
    resumed = json.loads((job / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["valid"]["bpc"] == expected["valid"]["bpc"]
    events = [list((d / "tensorboard").glob("events.out.tfevents.*")) for d in (job, tmp_path / "single")]
    assert len(events[0]) == len(events[1]) + 1  # the same TensorBoard run, continued after the requeue


def test_lightning_does_not_requeue_as_well_under_slurm(tiny_data, tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from charlm.train import build

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "charlm", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    import signal

    import lightning as L

    class Handlers(L.Callback):  # what answers SLURM's USR1 while training
        def on_train_start(self, trainer, pl_module):
            self.usr1 = signal.getsignal(signal.SIGUSR1)

    assert SLURMEnvironment.detect()
    handlers = Handlers()
    cfg = compose_config(f"data.data_dir={tiny_data}", f"run_dir={tmp_path}", "trainer.limit_train_batches=1",
                         "trainer.max_epochs=1", "trainer.limit_val_batches=0", *FAST)
    datamodule, model, trainer = build(cfg, extra_callbacks=[handlers])
    trainer.fit(model, datamodule=datamodule)
    assert handlers.usr1 in (signal.SIG_DFL, None)  # Lightning's requeue handler is not installed
    cfg = compose_config("hydra/launcher=slurm", hydra=True)
    assert cfg.hydra.launcher.max_num_timeout > 0  # a job that reaches its time limit is requeued too


def test_a_sweep_of_words_and_characters_reports_each_by_its_own_figure(real_data, tmp_path):
    """Word jobs are judged by perplexity, character jobs by bpc; a sweep mixing them says so."""
    sweep = tmp_path / "sweep"
    proc = run_train("-m", f"hydra.sweep.dir={sweep}", "data=ptb_char,ptb_word", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=20", "trainer.limit_val_batches=5", "trainer.limit_test_batches=5",
                     *TINY, data_dir=real_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["level"]: r for r in read_summary(sweep)}
    assert set(rows) == {"char", "word"} and {r["status"] for r in rows.values()} == {"completed"}
    word = json.loads((Path(rows["word"]["dir"]) / "metrics.json").read_text())
    assert float(rows["word"]["best_valid_ppl"]) == pytest.approx(word["best_valid_ppl"], rel=1e-12)
    assert rows["word"]["best_valid_bpc"] == "" and float(rows["char"]["best_valid_bpc"]) > 0
    md = (sweep / "summary.md").read_text()
    assert "mixes data levels (char, word)" in md and "best valid perplexity" in md and ".png" not in md
    words = tmp_path / "words"  # the word job alone, reported as a sweep of words: perplexity, plotted
    shutil.copytree(rows["word"]["dir"], words / "0")
    report = subprocess.run([sys.executable, "-m", "charlm.report", str(words), "--x", "data.level"],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "best valid perplexity" in report.stdout and "mixes" not in report.stdout
    assert (words / "learning_curves.png").read_bytes()[:8] == PNG


def test_a_jobs_directory_name_fits_any_file_system_and_stays_its_own():
    from charlm.resolvers import MAX_DIRNAME, dirname

    short = "data.seq_len=10,model.dropout=0.2"
    assert dirname(short) == short
    long = ",".join(f"trainer.limit_{k}_batches=5" for k in ("train", "val", "test")) * 4
    a, b = dirname(long + ",seed=1"), dirname(long + ",seed=2")
    assert len(a.encode()) <= MAX_DIRNAME and a != b and a.startswith("trainer.limit_train_batches=5")


def job_dirs(sweep: Path) -> dict[str, Path]:
    """A sweep's job directories by their data.seq_len override (a job whose overrides.yaml Hydra is still
    writing is left out: the caller polls again)."""
    jobs = {}
    for hydra_dir in (d for d in sweep.glob("*/.hydra") if (d / "overrides.yaml").is_file()):
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(hydra_dir / "overrides.yaml") or [] if "=" in o)
        if "data.seq_len" in overrides:
            jobs[overrides["data.seq_len"]] = hydra_dir.parent
    return jobs


def digests(job: Path) -> dict[str, str]:
    """Every file a job wrote, Hydra's .hydra/ and train.log aside (Hydra rewrites them for every launch)."""
    import hashlib

    return {str(p.relative_to(job)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(job.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}


def test_a_killed_sweep_is_finished_by_running_its_command_again(tmp_path):
    import signal
    import time

    from conftest import write_tiny_ptb

    data = write_tiny_ptb(tmp_path / "ptb", repeat=1200)  # ~1,800 windows an epoch: time to kill mid-epoch
    sweep = tmp_path / "sweep"
    command = ["-m", f"hydra.sweep.dir={sweep}", "trainer.max_epochs=1", "sweep.every_n_train_steps=50", *TINY]
    env = dict(os.environ, CHARLM_DATA_DIR=str(data), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *command, "data.seq_len=5,10,20"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (len(jobs := job_dirs(sweep)) == 2 and (jobs["10"] / "checkpoints" / "step.ckpt").exists()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.01)
    from charlm.report import load_job

    running = load_job(jobs["10"])["row"]["status"]  # as `python -m charlm.report` shows it now
    proc.send_signal(signal.SIGKILL)
    assert running == "running"
    assert (sweep / "planned.json").is_file()
    rows = {r["overrides"]: r for r in read_summary(sweep)}  # written when the first job ended
    assert [r["status"] for r in rows.values()] == ["completed", "pending", "pending"]
    proc.wait()
    proc.stderr.close()
    report = subprocess.run([sys.executable, "-m", "charlm.report", str(sweep)], capture_output=True, text=True)
    assert "1 completed, 1 pending, 1 interrupted" in report.stdout  # data.seq_len=20 never started
    first = digests(jobs["5"])

    again = run_train(*command, "data.seq_len=5,10,20,40", data_dir=data)  # the same sweep, its grid grown by one
    assert again.returncode == 0, again.stderr[-3000:]
    jobs_after = job_dirs(sweep)
    assert jobs_after["5"] == jobs["5"] and jobs_after["10"] == jobs["10"] and len(jobs_after) == 4
    assert digests(jobs["5"]) == first  # the completed job is kept as it was
    assert "resuming the interrupted job" in (jobs["10"] / "train.log").read_text()
    single = run_train(f"hydra.run.dir={tmp_path / 'single'}", "trainer.max_epochs=1", "data.seq_len=10", *TINY,
                       data_dir=data)
    assert single.returncode == 0, single.stderr[-2000:]
    expected = json.loads((tmp_path / "single" / "metrics.json").read_text())
    resumed = json.loads((jobs["10"] / "metrics.json").read_text())
    assert resumed["valid"]["bpc"] == expected["valid"]["bpc"] and resumed["steps"] == expected["steps"]
    assert [r["status"] for r in read_summary(sweep)] == ["completed"] * 4


def test_failed_jobs_run_again_or_are_kept_and_fail_fast_skips_the_rest(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    command = ["-m", f"hydra.sweep.dir={sweep}", "data.seq_len=0,5,10", "trainer.max_epochs=1", *TINY]
    assert run_train(*command, "sweep.fail_fast=true", data_dir=tiny_data).returncode == 1
    assert {r["overrides"].split("data.seq_len=")[1].split()[0]: r["status"] for r in read_summary(sweep)} == {
        "0": "failed", "5": "skipped", "10": "skipped"}
    assert run_train(*command, data_dir=tiny_data).returncode == 1  # again: the failed job runs again
    jobs = job_dirs(sweep)
    assert (jobs["0"] / "attempts" / "1" / "metrics.json").is_file()
    assert [json.loads((jobs[k] / "metrics.json").read_text())["status"] for k in ("5", "10")] == ["completed"] * 2
    assert run_train(*command, "sweep.rerun_failed=false", data_dir=tiny_data).returncode == 1
    assert not (jobs["0"] / "attempts" / "2").exists()  # kept as failed


def test_a_job_killed_after_its_last_epoch_runs_again_and_one_killed_mid_epoch_resumes(tiny_data, tmp_path):
    """Killed in its test, after last.ckpt and before metrics.json, a job has nothing to resume: it runs again."""
    from charlm import sweep
    from conftest import train_here

    job = tmp_path / "job"
    train_here(job, "trainer.max_epochs=1", *TINY, data_dir=tiny_data)
    (job / "metrics.json").unlink()
    cfg = compose_config(f"run_dir={job}", f"paths.data_dir={tiny_data}", "trainer.max_epochs=1", *TINY)
    assert sweep.plan(cfg) == "run" and cfg.ckpt_path is None
    assert (job / "attempts" / "1" / "checkpoints" / "last.ckpt").is_file()  # set aside, not lost
    train_here(job, "trainer.max_epochs=1", *TINY, data_dir=tiny_data)
    (job / "metrics.json").unlink()
    cfg = compose_config(f"run_dir={job}", f"paths.data_dir={tiny_data}", "trainer.max_epochs=2", *TINY)
    assert sweep.plan(cfg) == "resume" and cfg.ckpt_path == str(job / "checkpoints" / "last.ckpt")
