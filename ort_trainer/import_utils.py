"""Which ONNX Runtime and friends are installed, and can they be used.

onnxruntime, onnxruntime-gpu, onnxruntime-training and onnxruntime-training-cpu all install the import name
`onnxruntime`, so "installed" asks the distribution metadata and "usable" asks an import.
"""

import importlib.metadata
import importlib.util
from functools import lru_cache


ORT_TRAINING_DISTRIBUTIONS = ("onnxruntime-training", "onnxruntime-training-cpu")
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", *ORT_TRAINING_DISTRIBUTIONS)

ORT_INSTALL_HINT = "pip install 'ort_trainer[compile]' (any onnxruntime build trains through the compile backend)"
ORT_TRAINING_INSTALL_HINT = (
    "pip install 'ort_trainer[training-cpu]' (CPU) or 'ort_trainer[training-gpu]' (CUDA 11.8, Python <= 3.11)"
)


def _installed_distribution(import_name: str, dist_names: tuple) -> str | None:
    if importlib.util.find_spec(import_name) is None:
        return None
    for name in dist_names:
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def onnxruntime_distribution() -> str | None:
    """The pip name of the installed ONNX Runtime build, or None."""
    return _installed_distribution("onnxruntime", ORT_DISTRIBUTIONS)


def is_onnxruntime_available() -> bool:
    return onnxruntime_distribution() is not None


def is_onnxruntime_training_available() -> bool:
    return onnxruntime_distribution() in ORT_TRAINING_DISTRIBUTIONS


def is_onnxscript_available() -> bool:
    return _installed_distribution("onnxscript", ("onnxscript",)) is not None


@lru_cache
def onnxruntime_providers() -> tuple:
    if not is_onnxruntime_available():
        return ()
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())
