"""Models that build layers late: in the module's ``configure_model`` / ``setup`` (which Lightning
runs after the callbacks' ``setup``), or lazily (``nn.LazyLinear``, shaped by its first forward)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from hwaware import ProgressiveQuantization, SemiStructuredSparsity
from hwaware.quant.attach import quant_states
from tests.helpers import TinyCTR, loaders, make_trainer


class BuiltInConfigureModel(TinyCTR):
    """The MLP is built in configure_model (Lightning's place for it); only the table exists before."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        del self.mlp

    def configure_model(self) -> None:
        if not hasattr(self, "mlp"):
            self.mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 1))


class BuiltInSetup(BuiltInConfigureModel):
    def configure_model(self) -> None:
        pass

    def setup(self, stage: str) -> None:
        super().configure_model()


class Lazy(TinyCTR):
    """The first Linear is an nn.LazyLinear (its in_features known at its first forward)."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        self.mlp[0] = nn.LazyLinear(32)


def _fit(tmp_path, model, callbacks, **kw):
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks, **{"max_epochs": 2, **kw})
    trainer.fit(model, *loaders())
    return trainer


@pytest.mark.parametrize("model_cls", [BuiltInConfigureModel, BuiltInSetup])
def test_layers_built_by_the_module_at_fit_are_quantized_and_pruned(tmp_path, model_cls):
    """Planned in the callbacks' setup, before the module's: QAT refused the model as having no
    quantizable layer (when only the MLP was quantizable) and 2:4 pruned none of the late layers
    without a word (a trial)."""
    qat = ProgressiveQuantization(start_epoch=1, calibration_batches=2, skip="emb")
    sparse = SemiStructuredSparsity(start_epoch=1, skip=["mlp.2"])
    model = model_cls()
    _fit(tmp_path, model, [sparse, qat])
    assert sorted(quant_states(model)) == ["mlp.0", "mlp.2"]
    assert list(sparse.report["layers"]) == ["mlp.0"] and sparse.report["layers"]["mlp.0"]["verified_24"]
    assert sparse.report["skipped"]["mlp.2"] == "matches skip pattern 'mlp.2'"


def test_a_lazy_layer_unmaterialized_when_quantization_attaches_is_refused_by_name(tmp_path):
    """QAT from epoch 0 without a sanity check attached to a LazyLinear before its first forward,
    which turned it into a plain Linear: it trained FP32 while the report said int8, KL 0 (a trial)."""
    model = Lazy()
    with pytest.raises(ValueError, match=r"layer 'mlp.0': LazyLinear has not been materialized yet .* run one batch "
                                         r"through the model before fit"):
        _fit(tmp_path, model, [ProgressiveQuantization(start_epoch=0, calibration_batches=2)])


def test_a_lazy_layer_materialized_by_the_sanity_check_is_quantized_and_pruned(tmp_path):
    qat = ProgressiveQuantization(start_epoch=0, calibration_batches=2)
    sparse = SemiStructuredSparsity(start_epoch=0)
    model = Lazy()
    _fit(tmp_path, model, [sparse, qat], num_sanity_val_steps=1)
    assert type(model.mlp[0]) is not nn.LazyLinear and model.mlp[0].in_features == 12
    st = quant_states(model)["mlp.0"]
    assert st.enabled and st.weight.quantize
    x = torch.randn(3, 12)
    assert not torch.equal(model.mlp[0](x), nn.functional.linear(x, model.mlp[0].weight, model.mlp[0].bias))  # fake quant on
    assert "mlp.0" in sparse.report["layers"] and sparse.report["layers"]["mlp.0"]["verified_24"]


def test_a_lazy_layer_unmaterialized_when_pruning_starts_is_refused_by_name(tmp_path):
    """SemiStructuredSparsity read the lazy weight's shape at setup: torch's raw 'uninitialized
    parameter' error."""
    with pytest.raises(ValueError, match=r"layer 'mlp.0': LazyLinear has not been materialized yet"):
        _fit(tmp_path, Lazy(), [SemiStructuredSparsity(start_epoch=0)])
