"""hwaware: training-side model optimization for PyTorch Lightning.

Drop-in callbacks quantize (and later prune and distill) an unmodified LightningModule; see
README.md for the quickstart and ``python recipes/qat_recsys.py`` for the end-to-end recipe.
"""
from hwaware.callbacks import ProgressiveQuantization
from hwaware.quant import KLViolationError, QuantSpec, quant_states

__version__ = "0.1.0"

__all__ = ["ProgressiveQuantization", "QuantSpec", "KLViolationError", "quant_states", "__version__"]
