"""Manual optimization: steps of the torch optimizer itself (past Lightning's optimizer hooks) are
refused; steps through LightningOptimizer are fine wherever the module makes them."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl

from hwaware import ProgressiveQuantization, SemiStructuredSparsity
from tests.helpers import TinyCTR, loaders, make_trainer

CALLBACKS = [lambda: ProgressiveQuantization(start_epoch=1, calibration_batches=2, qat_epochs=1),
             lambda: SemiStructuredSparsity(start_epoch=1)]
IDS = ["qat", "2:4"]


class RawSteps(TinyCTR):
    def __init__(self, raw: bool = True) -> None:
        super().__init__(dim=28)
        self.automatic_optimization = False
        self.raw = raw

    def training_step(self, batch, batch_idx):
        opt = self.optimizers(use_pl_optimizer=not self.raw)
        loss = self._loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class EpochEndStep(TinyCTR):
    """Accumulates over the whole epoch and steps once, in the module's own on_train_epoch_end
    (Lightning does not count that step in global_step)."""

    def __init__(self) -> None:
        super().__init__(dim=28)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.manual_backward(self._loss(batch) / 8)

    def on_train_epoch_end(self):
        opt = self.optimizers()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("make", CALLBACKS, ids=IDS)
def test_a_step_of_the_raw_torch_optimizer_is_refused_at_once(tmp_path, make):
    """self.optimizers(use_pl_optimizer=False): calibration trained the weights, qat_epochs never
    counted (QAT ran to max_epochs), and pruning failed at the end blaming the optimizer (a trial)."""
    cb = make()
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    with pytest.raises(RuntimeError, match=r"SGD\.step\(\) ran outside Lightning's optimizer step .* step the optimizers "
                                           r"self\.optimizers\(\) returns \(LightningOptimizer\)"):
        trainer.fit(RawSteps(), *loaders())
    assert trainer.current_epoch == 0 and cb.phase in ("fp32", "dense")  # refused before calibration / pruning


@pytest.mark.parametrize("make", CALLBACKS, ids=IDS)
@pytest.mark.parametrize("model_cls", [lambda: RawSteps(raw=False), EpochEndStep], ids=["each_batch", "epoch_end"])
def test_steps_through_lightning_run_wherever_the_module_makes_them(tmp_path, make, model_cls):
    """An epoch-end check of global_step refused a module stepping once per epoch in its own
    on_train_epoch_end, whose steps went through LightningOptimizer (a review)."""
    cb = make()
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    trainer.fit(model_cls(), *loaders())
    assert cb.phase in ("done", "sparse")
