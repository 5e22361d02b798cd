"""Models and arguments as users bring them to export: each case here failed with a raw error, or was
exported silently wrong, in an adversarial trial of export on varied user models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwaware import QuantSpec
from hwaware.export import export, load
from hwaware.quant.attach import attach_quantization, find_quantizable


class BagScorer(nn.Module):
    """A table bag and an MLP to one logit per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.EmbeddingBag(20, 8, mode="sum")
        self.a = nn.Linear(8, 16)
        self.o = nn.Linear(16, 1)

    def forward(self, ids):
        return self.o(F.relu(self.a(self.e(ids)))).squeeze(-1)


def batches(n_batches: int = 2, rows: int = 16, last: int = 16):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_batches):
        b = last if i == n_batches - 1 else rows
        y = (torch.arange(b) % 2).float()  # both classes in every batch of two or more
        out.append((torch.randint(0, 20, (b, 3), generator=g), y))
    return out


def scorer() -> BagScorer:
    torch.manual_seed(0)
    return BagScorer().eval()


class Squeezed(BagScorer):
    def forward(self, ids):
        return super().forward(ids).squeeze()  # a batch of one: a 0-d prediction


def test_a_batch_of_one_squeezed_to_a_scalar_is_gated(tmp_path):
    # torch.cat refused the 0-d prediction of the last batch: a raw RuntimeError
    torch.manual_seed(0)
    art = export(Squeezed().eval(), tmp_path / "a", val_dataloader=batches(3, last=1), max_drop=1.0)
    assert art.report["passed"] and 0.0 <= art.report["reference"] <= 1.0


class OneArgPredictStep(BagScorer):
    def predict_step(self, batch):  # Lightning calls a predict_step without batch_idx so
        return self(batch[0])


def test_a_predict_step_without_batch_idx_is_called_as_lightning_calls_it(tmp_path):
    torch.manual_seed(0)
    model = OneArgPredictStep().eval()
    art = export(model, tmp_path / "a", val_dataloader=batches(), max_drop=1.0)
    ids = batches()[0][0]
    assert art.report["reference"] == pytest.approx(export(scorer(), tmp_path / "b", val_dataloader=batches(),
                                                           max_drop=1.0).report["reference"])
    assert torch.equal(art.model(ids), load(art.path, model=OneArgPredictStep())(ids))


def test_a_table_holding_nan_is_refused_as_a_linear_is(tmp_path):
    # the table stayed FP32 with the NaN, and the gate passed max_drop=0 with NaN predictions
    model = scorer()
    with torch.no_grad():
        model.e.weight[4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'e' cannot be packed: weight has 1 non-finite value\(s\) \(NaN/inf\), "
                                         r"the first at index \[4, 0\]"):
        export(model, tmp_path / "a", val_dataloader=batches(), max_drop=0.0)
    assert not (tmp_path / "a").exists()


def test_nan_predictions_are_refused_by_the_gate(tmp_path):
    class NaNInput(BagScorer):
        def forward(self, ids):
            out = super().forward(ids)
            return torch.where(ids[:, 0] == 3, float("nan"), out)  # the reference itself gives NaN for some rows

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"export: the FP32 reference gives NaN predictions for \d+ of 32 validation "
                                         r"samples \(its weights or the validation batches hold NaN/inf\)"):
        export(NaNInput().eval(), tmp_path / "a", val_dataloader=batches(), max_drop=1.0)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"path": 5}, TypeError, r"export: path=5; expected a directory path"),
    ({"embedding_bits": 8.0}, ValueError, r"embedding_bits=8.0; expected None \(8 bits post-training\) or the int 4 or 8"),
    ({"embedding_bits": True}, ValueError, r"embedding_bits=True"),
    ({"reference": "ckpt.pt"}, TypeError, r"export: reference='ckpt.pt'; expected None, an nn.Module or a state_dict"),
    ({"reference": {"a.weight": torch.zeros(16, 8)}}, ValueError,
     r"export: reference= is a state_dict that does not fit BagScorer: Error\(s\) in loading state_dict"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    args = {"path": tmp_path / "a", "val_dataloader": batches(), "max_drop": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        export(scorer(), **args)


def test_example_inputs_the_forward_refuses_say_where_they_came_from(tmp_path):
    with pytest.raises(RuntimeError) as e:
        export(scorer(), tmp_path / "a", example_inputs=(torch.randint(0, 20, (4, 3)).float(),))
    assert any("raised by the model's forward on example_inputs (tensors of shapes [[4, 3]])" in n
               for n in getattr(e.value, "__notes__", []))


def test_embedding_bits_other_than_the_trained_tables_is_refused():
    # export packed the QAT int8 tables and ignored embedding_bits=4 without a word
    model = scorer()
    table = QuantSpec(bits=8, granularity="per_row", symmetric=False, dynamic=True)
    plan, _ = find_quantizable(model, weight_spec=QuantSpec(), embedding_spec=table)
    for st in attach_quantization(model, plan).values():
        for q in st.quantizers():
            q.quantize = True
    model(batches()[0][0])
    with pytest.raises(ValueError, match=r"export: embedding_bits=4 chooses the tables' width for post-training export; "
                                         r"the tables of BagScorer were QAT trained at \[8\] bits"):
        export(model, "unused", embedding_bits=4)


def test_a_compiled_model_exports_as_the_model_it_wraps(tmp_path):
    # the artifact recorded torch's OptimizedModule and layers '_orig_mod.*': load(model=BagScorer) refused it
    model = scorer()
    compiled = torch.compile(model, backend="eager")
    art = export(compiled, tmp_path / "a", val_dataloader=batches(), max_drop=1.0)
    assert sorted(art.manifest["layers"]) == ["a", "e", "o"]
    assert art.manifest["model"]["class"].endswith("BagScorer")
    ids = batches()[0][0]
    assert torch.equal(load(art.path, model=BagScorer)(ids), art.model(ids))


class DeviceFromParameters(BagScorer):
    def forward(self, ids):
        return super().forward(ids.to(next(self.parameters()).device))


def test_a_forward_reading_next_parameters_is_told_why_it_fails(tmp_path):
    # a bare StopIteration: the deploy model's packed layers hold buffers, no Parameter
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"the model's forward raised StopIteration, and the model holds no "
                                        r"nn.Parameter: .* Read the device from an input"):
        export(DeviceFromParameters().eval(), tmp_path / "a", val_dataloader=batches(), max_drop=1.0)
    assert not (tmp_path / "a").exists()
