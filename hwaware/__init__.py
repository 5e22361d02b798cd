"""hwaware: training-side model optimization for PyTorch Lightning.

Drop-in callbacks quantize and 2:4-prune (and later distill) an unmodified LightningModule; see
README.md for the quickstart and ``python recipes/qat_recsys.py`` for the end-to-end recipe.
``hwaware.export(model, path, ...)`` writes a gated, packed artifact; ``hwaware.load(path)`` serves it.
"""
import hwaware.export  # noqa: F401  (callable: hwaware.export(model, path, ...))
from hwaware.callbacks import ProgressiveQuantization, SemiStructuredSparsity
from hwaware.export import Artifact, ArtifactError, KernelPortabilityWarning, RegressionError, load
from hwaware.quant import KLViolationError, QuantSpec, quant_states

__version__ = "0.1.0"

__all__ = [
    "ProgressiveQuantization", "SemiStructuredSparsity", "QuantSpec", "KLViolationError", "quant_states", "export", "load", "Artifact",
    "ArtifactError", "KernelPortabilityWarning", "RegressionError", "__version__",
]
