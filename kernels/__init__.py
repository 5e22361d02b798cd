"""Triton GPU kernels, installed as ``hwaware.kernels`` (never as a top-level ``kernels`` module).

Kernels are pure: pointers, block sizes and launchers; they know nothing of modules or Lightning.
They arrive with the Triton kernels issue; the package exists now so the layout is fixed.
"""
__all__: list = []
