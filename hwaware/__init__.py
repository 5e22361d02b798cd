"""hwaware: training-side model optimization for PyTorch Lightning.

Drop-in callbacks quantize and 2:4-prune (and later distill) an unmodified LightningModule; see
README.md for the quickstart and ``python recipes/qat_recsys.py`` for the end-to-end recipe.
``hwaware.export(model, path, ...)`` writes a gated, packed artifact; ``hwaware.load(path)`` serves it.
"""
import importlib

import hwaware.export  # noqa: F401  (callable: hwaware.export(model, path, ...))
from hwaware.export import Artifact, ArtifactError, KernelPortabilityWarning, RegressionError, load
from hwaware.quant import KLViolationError, QuantSpec, quant_states

__version__ = "0.1.0"

# The callbacks import Lightning (seconds, ~180 MiB): a server that only loads artifacts and runs the
# ops never pays for it. ``from hwaware import ProgressiveQuantization`` imports it on first use.
_LAZY = {"ProgressiveQuantization": "hwaware.callbacks", "SemiStructuredSparsity": "hwaware.callbacks"}
_SUBMODULES = ("callbacks", "recsys", "sparsity")  # hwaware.callbacks etc. without importing them first


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"hwaware.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hwaware' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))

__all__ = [
    "ProgressiveQuantization", "SemiStructuredSparsity", "QuantSpec", "KLViolationError", "quant_states", "export", "load", "Artifact",
    "ArtifactError", "KernelPortabilityWarning", "RegressionError", "__version__",
]
