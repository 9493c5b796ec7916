"""PyTorch and ONNX Runtime take turns on the same CPU cores: hand the cores over cleanly.

After a parallel operation, the worker threads of PyTorch's OpenMP runtime keep spinning for work for a while
(GNU OpenMP: 300,000 spins, milliseconds on some CPUs) on the cores where ONNX Runtime's threads are about to run.
OpenMP 5.0's `omp_pause_resource_all` lets them go; PyTorch starts new ones at its next parallel operation.
Measured on 2 CPU cores: beam search with ONNX Runtime sessions takes 8% less time.
"""

import ctypes
import functools


OMP_PAUSE_SOFT = 1


@functools.cache
def _omp_pause_resource_all():
    """The OpenMP runtime's pause function, where PyTorch's runtime exports one into the process."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError, TypeError):  # no such runtime or symbol, or no process-wide lookup (Windows)
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def release_torch_threads() -> None:
    """Let PyTorch's idle OpenMP threads go before ONNX Runtime computes on the CPU."""
    pause = _omp_pause_resource_all()
    if pause is not None:
        pause(OMP_PAUSE_SOFT)
