"""Quantization core in pure torch: specs, observers, fake quantization, attachment, KL validation."""
from hwaware.quant.attach import (
    QuantState, attach_quantization, detach_quantization, find_quantizable, fp32_reference, quant_states, quantization_disabled, set_fp32_reference,
)
from hwaware.quant.fake_quant import FakeQuantizer
from hwaware.quant.kl import KLViolationError, LayerErrorCollector, histogram_kl, output_kl
from hwaware.quant.observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer, make_observer
from hwaware.quant.primitives import compute_qparams, dequantize, fake_quantize, quantize, sqnr_db
from hwaware.quant.spec import QuantSpec

__all__ = [
    "QuantSpec", "QuantState", "FakeQuantizer", "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver",
    "HistogramObserver", "make_observer", "attach_quantization", "detach_quantization", "find_quantizable",
    "quant_states", "quantization_disabled", "fp32_reference", "set_fp32_reference", "compute_qparams", "quantize", "dequantize", "fake_quantize", "sqnr_db", "histogram_kl",
    "output_kl", "LayerErrorCollector", "KLViolationError",
]
