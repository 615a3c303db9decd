"""Hyperparameter search with Optuna, as a Hydra sweeper (`python train.py -m hparams_search=optuna`).

Each trial is one sweep job: Optuna's ask-and-tell API asks for a trial's values, the configured Hydra
launcher runs the job (basic, `parallel`, `slurm`), and its best valid figure (bpc for characters,
perplexity for words) is told back. The study lives in a database (SQLite `<sweep dir>/optuna.db` unless
`hydra.sweeper.storage` names another), so the same command run again continues it: a trial killed with its
sweeper is marked failed and asked again with the same values, and its job, found by its overrides,
resumes from its last.ckpt (charlm.sweep). hydra-optuna-sweeper, the field's plugin, requires optuna < 3,
whose SQLite storage fails on SQLAlchemy 2: hence this thin sweeper over current Optuna.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from charlm.errors import CharlmError
from charlm.files import write_json
from charlm.sweep import PRUNED, SEARCH, pid_alive

log = logging.getLogger(__name__)


def storage_url(storage: str | None, sweep_dir: str | Path) -> str:
    """The study's database: `storage` if given (any URL Optuna takes), else SQLite in the sweep directory."""
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def open_storage(url: str):
    import optuna

    # parallel jobs write to one SQLite file: wait for its lock rather than fail at once
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


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
        study = optuna.create_study(storage=open_storage(storage_url(s.storage, sweep_dir)),
                                    study_name=s.study_name or sweep_dir.name, direction=s.direction,
                                    pruner=hydra_instantiate(s.pruner), load_if_exists=True)
        # seeded anew from the trials it holds, so a continued study does not repeat its first random trials
        seed = (s.seed or 0) + len(study.trials)
        study.sampler = hydra_instantiate(s.sampler, seed=seed)
        return study

    def continue_killed(self, study) -> None:
        """Trials of an earlier sweeper of this host that died with it (still RUNNING, their pid gone):
        marked failed, and their values asked again first, so their jobs resume from their last.ckpt."""
        import optuna

        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            attrs = trial.user_attrs
            if attrs.get("host") != socket.gethostname() or pid_alive(attrs.get("pid")):
                continue  # another host's sweeper, or a live one: not ours to judge
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"continues": trial.number})
            log.info(f"trial {trial.number} was killed with its sweeper: marked failed, its values asked again")

    def sweep(self, arguments: list[str], validate) -> list:
        """Add n_trials trials to the study, n_jobs at a time; `validate` composes a batch's configs first."""
        import optuna

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        fixed, space = self.split(arguments)
        study = self.open_study(sweep_dir)
        self.continue_killed(study)
        todo, returns = int(self.settings.n_trials), []
        log.info(f"study {study.study_name} ({storage_url(self.settings.storage, sweep_dir)}): {len(study.trials)} "
                 f"trials so far, {todo} to add, {self.settings.n_jobs} at a time")
        while todo > 0:
            trials = [study.ask(space) for _ in range(min(int(self.settings.n_jobs), todo))]
            batch = []
            for trial in trials:
                overrides = [*fixed, *(f"{k}={override_value(v)}" for k, v in trial.params.items()),
                             f"trial={trial.number}"]
                trial.set_user_attr("overrides", overrides[:-1])
                trial.set_user_attr("host", socket.gethostname())
                trial.set_user_attr("pid", os.getpid())
                batch.append(overrides)
            try:
                validate(batch)
            except Exception:
                for trial in trials:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, result in zip(trials, results):
                self.tell(study, trial, result)
            returns.append(results)
            write_json(sweep_dir / SEARCH, summary(study, fixed))
            todo -= len(trials)
        return returns

    @staticmethod
    def tell(study, trial, result) -> None:
        import optuna
        from hydra.core.utils import JobStatus

        run_dir = Path(result.hydra_cfg.hydra.runtime.output_dir) if result.hydra_cfg is not None else None
        if run_dir is not None:
            trial.set_user_attr("dir", str(run_dir))
        value = result.return_value if result.status == JobStatus.COMPLETED else None
        if run_dir is not None and (run_dir / PRUNED).is_file():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info(f"trial {trial.number}: pruned")
        elif isinstance(value, (int, float)) and value == value:
            study.tell(trial, value)
            log.info(f"trial {trial.number}: {value:.4f} (best {study.best_value:.4f}, trial {study.best_trial.number})")
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.info(f"trial {trial.number}: failed (its metrics.json says why)")


def hydra_instantiate(node, **kwargs):
    """A sampler or pruner from its config node; one Hydra already built is returned as it is."""
    from hydra.utils import instantiate

    return instantiate(node, **kwargs) if isinstance(node, (dict, DictConfig)) else node


def summary(study, fixed: list[str]) -> dict:
    """The study as the sweep report reads it: every trial, the best, and the command that trains the best."""
    import optuna

    frozen = study.get_trials(deepcopy=False)
    trials = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
               "dir": t.user_attrs.get("dir")} for t in frozen]
    result = {"study": study.study_name, "direction": study.direction.name.lower(), "trials": trials, "best": None}
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in frozen):
        best = study.best_trial
        overrides = [o for o in best.user_attrs.get("overrides", fixed) if not o.startswith("hparams_search=")]
        result["best"] = {"number": best.number, "value": best.value, "params": best.params,
                          "command": " ".join(["python train.py", *overrides])}
    return result


class PruneTrial(L.Callback):
    """Reports each validation's figure to the job's Optuna trial and stops the job when the study's pruner
    says its curve is clearly behind (optuna-integration's PyTorchLightningPruningCallback needs the trial
    object in the same process; a sweep's job runs in a process of the launcher's). A stopped job writes
    pruned.json and ends as completed, with its best figure so far; a run outside a search does nothing."""

    def __init__(self, trial: int | None, storage: str | None, sweep_dir: str, study_name: str | None,
                 pruner=None) -> None:
        self.trial_number, self.url = trial, storage_url(storage, sweep_dir)
        self.study_name, self.pruner = study_name or Path(sweep_dir).name, pruner
        self.trial = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.trial_number is None or stage != "fit" or self.trial is not None:
            return
        import optuna

        storage = open_storage(self.url)
        study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=hydra_instantiate(self.pruner))
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study_name),
                                                                   int(self.trial_number))
        self.trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.trial is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        key = f"valid/{pl_module.kind.headline}"
        if key not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[key])
        # the step as the per cent of the run's steps done: trials of other BPTT lengths or batch sizes (other
        # step counts for the same data) are compared at the same point of their budget
        done = round(100 * trainer.global_step / max(trainer.estimated_stepping_batches, 1))
        self.trial.report(value, step=done)
        if self.trial.should_prune():
            write_json(Path(trainer.default_root_dir) / PRUNED, {"step": trainer.global_step, key: value})
            log.info(f"trial {self.trial_number} pruned at {done} % of its steps ({key} {value:.4f})")
            trainer.should_stop = True

