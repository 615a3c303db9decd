"""Hyperparameter search with Optuna, as a Hydra sweeper (`python train.py -m hparams_search=optuna`).

Each trial is one sweep job: Optuna's ask-and-tell API asks for a trial's values, the configured Hydra
launcher runs the job (basic, `parallel`, `slurm`), and its best valid figure (bpc for characters,
perplexity for words) is told back. Each slot of the launcher (a device of the parallel pool, a SLURM job)
asks for its next trial as soon as its own ends, with every result so far: no slot waits for another's.
The study lives in a database (SQLite `<sweep dir>/optuna.db` unless `hydra.sweeper.storage` names another,
PostgreSQL for several nodes), so the same command run again, or on another node, continues it. Running
trials send heartbeats to it; one whose sweeper and job died, on any host, is failed by the next ask of any
sweeper of the study and asked again with the same values, so its job, found by its overrides, resumes from
its last.ckpt (charlm.sweep). hydra-optuna-sweeper, the field's plugin, requires optuna < 3, whose SQLite
storage fails on SQLAlchemy 2: hence this thin sweeper over current Optuna.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import warnings
import zlib
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from charlm.errors import CharlmError
from charlm.files import atomic_write, write_json
from charlm.sweep import PRUNED, SEARCH

log = logging.getLogger(__name__)


def storage_url(storage: str | None, sweep_dir: str | Path) -> str:
    """The study's database: `storage` if given (any URL Optuna takes), else SQLite in the sweep directory."""
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def shown(url: str) -> str:
    """A storage URL as logs show it: without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None):
    """The study's storage; with `heartbeat_interval`, a trial whose heartbeat is `grace_period` s old is
    failed by `fail_stale` and enqueued again with its values (at most `max_retry` times)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    # the heartbeat has been Optuna's since 2.9, still marked experimental; Optuna's warning at each ask is for
    # Study.optimize, which records heartbeats itself: here the sweeper does (class Heartbeat)
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    # parallel jobs write to one SQLite file: wait for its lock rather than fail at once
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    beat = {}
    if heartbeat_interval is not None:
        for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CharlmError(f"hydra.sweeper.{name}={value}: give whole seconds, at least 1 (or null)")
        beat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)}
    try:
        return created(lambda: optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **beat))
    except ImportError:
        raise CharlmError(f"the study's storage {shown(url)} needs a database driver that is not installed; for "
                          f"PostgreSQL: pip install -e '.[postgres]'") from None


def created(open_, tries: int = 6):
    """open_() again while it fails: sweepers started together on a new database both create Optuna's tables,
    and the one that loses that race (a duplicate type or row) finds them made when it tries again."""
    import sqlalchemy.exc

    for attempt in range(tries):
        try:
            return open_()
        except sqlalchemy.exc.DBAPIError as e:
            if attempt == tries - 1:
                reason = str(e.orig or e).strip().splitlines()[0]
                raise CharlmError(f"the study's storage cannot be opened: {reason}") from None
            log.debug(f"the study's tables were not ready ({type(e).__name__}): tried again")
            time.sleep(0.5 * (attempt + 1))


class Heartbeat:
    """Records a heartbeat of each trial it holds in the storage every `interval` s, from a daemon thread (the
    first at once: Optuna never judges a trial without one). A trial whose heartbeats stop, its sweeper and
    its job dead on whichever host, is failed by any sweeper of the study once `grace_period` s pass."""

    def __init__(self, storage, interval: int | None) -> None:
        self.storage, self.interval = storage, interval
        self.ids: set[int] = set()
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        if not self.interval:
            return
        self.storage.record_heartbeat(trial_id)
        with self.lock:
            self.ids.add(trial_id)
            if self.thread is None:
                self.thread = threading.Thread(target=self.beat, name="optuna heartbeat", daemon=True)
                self.thread.start()

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def beat(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = sorted(self.ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # the database away for a moment: the next beat tries again
                    log.warning(f"no heartbeat recorded for trial id {trial_id}: {e}")

    def close(self) -> None:
        self.stopped.set()


def fail_stale(study) -> None:
    """Fail the study's trials whose heartbeat stopped and enqueue them again (the storage's callback); two
    sweepers doing it at once fail and enqueue each trial once (the storage changes a trial's state once)."""
    import optuna

    try:
        optuna.storages.fail_stale_trials(study)
    except optuna.exceptions.StorageInternalError as e:  # SQLite busy with another sweeper's writes: next ask
        log.debug(f"stale trials not checked now: {e}")


def distribution(name: str, value):
    """The Optuna distribution of a search-space entry in Hydra's override grammar: `choice(a, b)`,
    `range(lo, hi, step)` (ints), `interval(lo, hi)` (floats, ints if both ends are), `tag(log, ...)`."""
    import optuna.distributions as d
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    log_scale = "log" in getattr(value, "tags", ())
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution(value.list)
    if isinstance(value, RangeSweep):
        values = list(range(int(value.start), int(value.stop), int(value.step or 1)))
        if not values:
            raise CharlmError(f"hydra.sweeper.params.{name}: {value} is empty")
        return d.IntDistribution(values[0], values[-1], step=int(value.step or 1))
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise CharlmError(f"hydra.sweeper.params.{name}: {value} is not a search space; "
                      "use choice(...), range(...), interval(...) or tag(log, interval(...))")


def override_value(value) -> str:
    """A trial's value as the override its job trains with: floats at 4 significant digits, readable in the
    job's directory name."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class OptunaSearch:
    """The sweeper's work (hydra_plugins.charlm_optuna_sweeper holds the class Hydra loads)."""

    def __init__(self, config: DictConfig, launcher, hydra_context, settings: DictConfig) -> None:
        self.config, self.launcher, self.hydra_context, self.settings = config, launcher, hydra_context, settings

    def split(self, arguments: list[str]) -> tuple[list[str], dict]:
        """The command line's fixed overrides, and the search space: the config's params, then the command
        line's sweeps (`optimizer.lr='tag(log,interval(1e-3,1e-2))'`) over them."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [f"{k}={v}" for k, v in (self.settings.params or {}).items()]
        fixed, space = [], {}
        for override in parser.parse_overrides([*params, *arguments]):
            key = override.get_key_element()
            if override.is_sweep_override():
                space[key] = distribution(key, override.value())
            else:
                space.pop(key, None)
                fixed.append(f"{key}={override.get_value_element_as_str()}")
        if not space:
            raise CharlmError("the search space is empty: set hydra.sweeper.params (conf/hparams_search/optuna.yaml)")
        return fixed, space

    def open_study(self, sweep_dir: Path):
        import optuna

        s = self.settings
        storage = open_storage(storage_url(s.storage, sweep_dir), s.get("heartbeat_interval"), s.get("grace_period"),
                               s.get("max_retry"))
        study = optuna.create_study(storage=storage, study_name=s.study_name or sweep_dir.name, direction=s.direction,
                                    pruner=hydra_instantiate(s.pruner), load_if_exists=True)
        # seeded anew from the trials it holds, so a continued study does not repeat its first random trials, and
        # from this sweeper's host and pid, so that sweepers started together on one study do not ask the same
        seed = zlib.crc32(f"{s.seed or 0} {len(study.trials)} {socket.gethostname()} {os.getpid()}".encode())
        study.sampler = hydra_instantiate(s.sampler, seed=seed)
        return study, storage

    def slots(self) -> int:
        """Trials at a time: n_jobs, or one on the basic launcher, which runs its jobs in this process."""
        n = int(self.settings.n_jobs)
        if n < 1:
            raise CharlmError(f"hydra.sweeper.n_jobs={n}: give at least 1")
        if n > 1 and type(self.launcher).__name__ == "BasicLauncher":  # Hydra's own, in a private module
            log.info(f"hydra.sweeper.n_jobs={n} on the basic launcher, which runs one job at a time in this "
                     f"process: 1 at a time (hydra/launcher=parallel runs several)")
            return 1
        return n

    def sweep(self, arguments: list[str], validate) -> list:
        """Add n_trials trials to the study, each slot taking the next as soon as its own ends; `validate`
        composes a trial's config before its job is launched."""
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config).encode())  # several sweepers
        fixed, space = self.split(arguments)
        study, storage = self.open_study(sweep_dir)
        slots = self.slots()
        log.info(f"study {study.study_name} ({shown(storage_url(self.settings.storage, sweep_dir))}): "
                 f"{len(study.trials)} trials so far, {self.settings.n_trials} to add, {slots} at a time")
        run = Slots(study, storage, fixed, space, validate, sweep_dir, int(self.settings.n_trials),
                    Heartbeat(storage, self.settings.get("heartbeat_interval")))
        threads = [threading.Thread(target=self.slot, args=(run,), name=f"slot {i}", daemon=True)
                   for i in range(1, slots)]
        try:
            for thread in threads:
                thread.start()
            self.slot(run)  # slot 0 in this thread: signals reach a job that the basic launcher runs here
            for thread in threads:
                thread.join()
        finally:
            run.heartbeat.close()
        write_summary(study, fixed, sweep_dir)
        if run.error is not None:
            raise run.error
        return run.returns

    def slot(self, run: Slots) -> None:
        """One slot's loop: ask for a trial (after failing the stale ones, so that their retries come first),
        run its job, tell its result; until the launch's trials are all asked or a slot met an error, which
        stops the others asking and is raised once their running trials end."""
        try:
            self.run_slot(run)
        except Exception as e:
            with run.lock:
                run.error = run.error or e

    def run_slot(self, run: Slots) -> None:
        import optuna

        while True:
            with run.lock:
                if run.todo <= 0 or run.error is not None:
                    return
                run.todo -= 1
                fail_stale(run.study)
                trial = run.study.ask(run.space)
                overrides = [*run.fixed, *(f"{k}={override_value(v)}" for k, v in trial.params.items())]
                trial.set_user_attr("overrides", overrides)
                trial.set_user_attr("sweeper", f"{socket.gethostname()}:{os.getpid()}")
                tid = trial_id(run.storage, run.study, trial.number)
                run.heartbeat.add(tid)
                overrides = [*overrides, f"trial={trial.number}"]
                try:
                    run.validate([overrides])
                except Exception:
                    run.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    run.heartbeat.discard(tid)
                    raise
            try:
                wait_for_twin(run.study, trial, overrides[:-1], run.heartbeat.interval or 10)
                (result,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            except Exception:  # the launcher's own failure (its job's process killed, the cluster gone)
                with run.lock:
                    run.heartbeat.discard(tid)
                    retry(run.study, run.storage, trial, tid)
                raise
            with run.lock:
                run.heartbeat.discard(tid)
                self.tell(run.study, trial, result)
                run.returns.append([result])
                write_summary(run.study, run.fixed, run.sweep_dir)

    @staticmethod
    def tell(study, trial, result) -> None:
        import optuna
        from hydra.core.utils import JobStatus

        run_dir = Path(result.hydra_cfg.hydra.runtime.output_dir) if result.hydra_cfg is not None else None
        value = result.return_value if result.status == JobStatus.COMPLETED else None
        try:
            if run_dir is not None:
                trial.set_user_attr("dir", str(run_dir))
            if run_dir is not None and (run_dir / PRUNED).is_file():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log.info(f"trial {trial.number}: pruned")
            elif isinstance(value, (int, float)) and value == value:
                study.tell(trial, value)
                log.info(f"trial {trial.number}: {value:.4f} (best {study.best_value:.4f}, trial {study.best_trial.number})")
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.info(f"trial {trial.number}: failed (its metrics.json says why)")
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
            if not study.get_trials(deepcopy=False)[trial.number].state.is_finished():
                raise
            log.warning(f"trial {trial.number} was failed while it ran, its heartbeat stopped for grace_period s, and "
                        f"asked again: its job's result goes to that trial ({e})")


class Slots:
    """What the slots of one sweeper share, under `lock`: the study, the trials left to ask, their results,
    the first error, and the heartbeat of their running trials."""

    def __init__(self, study, storage, fixed, space, validate, sweep_dir: Path, todo: int, heartbeat: Heartbeat) -> None:
        self.study, self.storage, self.fixed, self.space, self.validate = study, storage, fixed, space, validate
        self.sweep_dir = sweep_dir
        self.todo, self.heartbeat = todo, heartbeat
        self.returns: list = []
        self.error: BaseException | None = None
        self.lock = threading.Lock()


def wait_for_twin(study, trial, overrides: list[str], poll_s: float) -> None:
    """Wait while an earlier trial with the same overrides runs (a categorical space asks a combination
    again, maybe on another node): two jobs must not share a directory. The job then finds that directory's
    result and returns it, or resumes it if that trial died."""
    import optuna

    said = False
    while True:
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        twin = next((t for t in running if t.number < trial.number and t.user_attrs.get("overrides") == overrides), None)
        if twin is None:
            return
        if not said:
            log.info(f"trial {trial.number} has the values of trial {twin.number}, still running: it waits for it")
            said = True
        time.sleep(poll_s)
        fail_stale(study)  # a twin whose sweeper died is failed, not waited for


def trial_id(storage, study, number: int) -> int:
    """The storage's id of the study's trial `number` (what heartbeats are recorded by)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def retry(study, storage, trial, tid: int) -> None:
    """Fail a trial whose job the launcher lost, and enqueue its values again, as a stale trial's are."""
    import optuna

    try:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except (ValueError, RuntimeError):  # already failed by a sweeper, which enqueued it
        return
    callback = storage.get_heartbeat_stale_trial_callback()  # None without a heartbeat
    if callback is not None:
        callback(study, storage.get_trial(tid))
        log.info(f"trial {trial.number}: its job was lost; its values are asked again by the next ask")


def write_summary(study, fixed: list[str], sweep_dir: Path) -> None:
    """search.json from the study as it is now: read and written under a lock, so that of several sweepers
    of the study the last writer has read every result before it; atomic, never half-written."""
    with open(sweep_dir / ".search.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_json(sweep_dir / SEARCH, summary(study, fixed))


def hydra_instantiate(node, **kwargs):
    """A sampler or pruner from its config node; one Hydra already built is returned as it is."""
    from hydra.utils import instantiate

    return instantiate(node, **kwargs) if isinstance(node, (dict, DictConfig)) else node


def summary(study, fixed: list[str]) -> dict:
    """The study as the sweep report reads it: every trial, the best, and the command that trains the best."""
    import optuna

    frozen = study.get_trials(deepcopy=False)
    trials = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
               "dir": t.user_attrs.get("dir"), "retry_of": t.system_attrs.get("failed_trial")} for t in frozen]
    result = {"study": study.study_name, "direction": study.direction.name.lower(), "trials": trials, "best": None}
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in frozen):
        best = study.best_trial
        overrides = [o for o in best.user_attrs.get("overrides", fixed) if not o.startswith("hparams_search=")]
        result["best"] = {"number": best.number, "value": best.value, "params": best.params,
                          "command": " ".join(["python train.py", *overrides])}
    return result


class PruneTrial(L.Callback):
    """The job's side of its Optuna trial. It reports each validation's figure to the trial and stops the job
    when the study's pruner says its curve is clearly behind (optuna-integration's
    PyTorchLightningPruningCallback needs the trial object in the same process; a sweep's job runs in a
    process of the launcher's): a stopped job writes pruned.json and ends as completed, with its best figure
    so far. While the job trains it records the trial's heartbeat too, so that a job that outlives its sweeper
    (a SLURM job) keeps its trial from being retried beside it. A run outside a search does nothing."""

    def __init__(self, trial: int | None, storage: str | None, sweep_dir: str, study_name: str | None,
                 pruner=None, heartbeat_interval: int | None = None) -> None:
        self.trial_number, self.url = trial, storage_url(storage, sweep_dir)
        self.study_name, self.pruner = study_name or Path(sweep_dir).name, pruner
        self.heartbeat_interval = heartbeat_interval
        self.trial, self.heartbeat, self.reported_out = None, None, False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.trial_number is None:
            return
        if self.trial is None:
            import optuna

            self.storage = open_storage(self.url)
            study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                      pruner=hydra_instantiate(self.pruner))
            self.trial_id = trial_id(self.storage, study, int(self.trial_number))
            self.trial = optuna.trial.Trial(study, self.trial_id)
        if trainer.is_global_zero and self.heartbeat_interval and self.heartbeat is None:
            self.heartbeat = Heartbeat(self.storage, self.heartbeat_interval)  # through fit and test alike
            self.heartbeat.add(self.trial_id)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "")

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.trial is None or trainer.sanity_checking or not trainer.is_global_zero or self.reported_out:
            return
        import optuna

        key = f"valid/{pl_module.kind.headline}"
        if key not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[key])
        # the step as the per cent of the run's steps done: trials of other BPTT lengths or batch sizes (other
        # step counts for the same data) are compared at the same point of their budget
        done = round(100 * trainer.global_step / max(trainer.estimated_stepping_batches, 1))
        try:
            self.trial.report(value, step=done)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale by a sweeper: its retry reports
            log.warning(f"trial {self.trial_number} is no longer running in the study: not reported")
            self.reported_out = True
            return
        if self.trial.should_prune():
            write_json(Path(trainer.default_root_dir) / PRUNED, {"step": trainer.global_step, key: value})
            log.info(f"trial {self.trial_number} pruned at {done} % of its steps ({key} {value:.4f})")
            trainer.should_stop = True
