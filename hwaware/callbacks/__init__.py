"""Lightning callbacks: they schedule the techniques in hwaware.quant and hwaware.sparsity."""
from hwaware.callbacks.progressive_quantization import ProgressiveQuantization
from hwaware.callbacks.semi_structured_sparsity import SemiStructuredSparsity

__all__ = ["ProgressiveQuantization", "SemiStructuredSparsity"]
