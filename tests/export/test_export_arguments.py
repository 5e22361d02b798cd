"""export's argument checks: what it accepts, and errors that name the argument before any work."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hwaware.export import export


def _mlp_and_val():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    return model, [(x, (x[:, :1] > 0).float())]


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5),
                                   torch.tensor(1, dtype=torch.int64), np.int64(1), 1, 0.5])
def test_max_drop_accepts_any_real_scalar(tmp_path, value):
    model, val = _mlp_and_val()
    art = export(model, tmp_path / "art", val_dataloader=val, max_drop=value)
    assert type(art.report["max_drop"]) is float and art.report["max_drop"] == pytest.approx(float(value))


@pytest.mark.parametrize("value, type_name", [
    (True, "builtins.bool"), (np.bool_(False), "numpy.bool"), (torch.tensor(True), "torch.Tensor"),
    (math.nan, "builtins.float"), (np.float32("inf"), "numpy.float32"), (torch.tensor(-0.1), "torch.Tensor"),
    (-1, "builtins.int"), (torch.tensor([0.1]), "torch.Tensor"), (np.array([0.1, 0.2]), "numpy.ndarray"),
    ("0.1", "builtins.str"), (None, "builtins.NoneType"), (torch.tensor(0.1 + 0j), "torch.Tensor"),
])
def test_max_drop_rejects_non_real_non_finite_negative_or_non_scalar_values(tmp_path, value, type_name):
    model, val = _mlp_and_val()
    with pytest.raises(ValueError, match=r"max_drop=.*of type " + type_name.replace(".", r"\.")
                       + r".*; expected a finite real number >= 0"):
        export(model, tmp_path / "art", val_dataloader=val, max_drop=value)
    assert not (tmp_path / "art").exists()
