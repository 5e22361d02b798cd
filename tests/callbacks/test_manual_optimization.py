"""Manual optimization that steps the torch optimizer itself, past Lightning's optimizer hooks."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from hwaware import ProgressiveQuantization, SemiStructuredSparsity
from tests.helpers import TinyCTR, loaders, make_trainer


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


@pytest.mark.parametrize("make", [lambda: ProgressiveQuantization(start_epoch=1, calibration_batches=2, qat_epochs=1),
                                  lambda: SemiStructuredSparsity(start_epoch=1)], ids=["qat", "2:4"])
def test_steps_of_the_raw_torch_optimizer_are_refused_after_the_first_epoch(tmp_path, make):
    """self.optimizers(use_pl_optimizer=False): calibration trained the weights, qat_epochs never
    counted (QAT ran to max_epochs), and pruning failed at the end blaming the optimizer (a trial)."""
    cb = make()
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    with pytest.raises(RuntimeError, match=r"this epoch ran 8 training batch\(es\) under manual optimization, but no "
                                           r"optimizer step went through Lightning \(global_step stayed 0\)"):
        trainer.fit(RawSteps(), *loaders())
    assert trainer.current_epoch == 0 and cb.phase in ("fp32", "dense")  # refused before calibration / pruning
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "pl", [make()], max_epochs=3)
    trainer.fit(RawSteps(raw=False), *loaders())  # through LightningOptimizer: runs
    assert trainer.global_step > 0
