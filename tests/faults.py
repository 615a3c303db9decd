"""Faults the reliability tests inject through config, e.g. `+callbacks.fault._target_=faults.NaNWeightsAt`."""

import lightning as L
import torch


class NaNWeightsAt(L.Callback):
    """Turns the decoder's weights into NaN just before training step `step`, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.decoder.weight.fill_(float("nan"))
