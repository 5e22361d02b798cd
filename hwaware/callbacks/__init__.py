"""Lightning callbacks: they schedule the techniques in hwaware.quant (and later sparsity, distillation)."""
from hwaware.callbacks.progressive_quantization import ProgressiveQuantization

__all__ = ["ProgressiveQuantization"]
