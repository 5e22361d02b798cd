"""Export to deployment: pack, gate, and write/read verified artifacts (manifest + safetensors).

See :mod:`hwaware.export.artifact` for the format (version 1) and its guarantees.
"""
from hwaware.export.artifact import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ArtifactError,
    artifact_size_bytes,
    is_artifact,
    read_manifest,
    read_tensors,
    verify_artifact,
    write_artifact,
)
from hwaware.export.exporter import Artifact, KernelPortabilityWarning, RegressionError, export, load

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ArtifactError", "artifact_size_bytes", "is_artifact", "read_manifest", "read_tensors",
    "verify_artifact", "write_artifact", "Artifact", "KernelPortabilityWarning", "RegressionError", "export", "load",
]


class _CallableModule(type(__import__("sys"))):
    """``hwaware.export`` is both this package and the function: importing a submodule
    (``hwaware.export.bench``) rebinds the package attribute, so the package itself forwards calls."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
# inspect.signature(hwaware.export) and tools built on it: the function's, not (*args, **kwargs)
__signature__ = __import__("inspect").signature(export)
