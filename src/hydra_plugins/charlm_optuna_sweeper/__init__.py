"""Hydra finds sweepers in the hydra_plugins namespace and imports them all at start-up: this one stays
light, and its work is in charlm.search."""

from hydra.plugins.sweeper import Sweeper


class OptunaSweeper(Sweeper):
    """`hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml): an Optuna study, a trial per job."""

    def __init__(self, **settings) -> None:
        self.settings = settings

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins
        from omegaconf import OmegaConf

        from charlm.search import OptunaSearch

        self.hydra_context, self.config = hydra_context, config  # what Sweeper.validate_batch_is_legal reads
        launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                           config=config)
        self.search = OptunaSearch(config, launcher, hydra_context, OmegaConf.create(self.settings))

    def sweep(self, arguments):
        return self.search.sweep(arguments, validate=self.validate_batch_is_legal)
