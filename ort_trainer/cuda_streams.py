"""ONNX Runtime on CUDA next to PyTorch, without waiting for the GPU.

A session run on CUDA normally ends by waiting for its kernels, so the host time around it (collating the next
batch, the Trainer's bookkeeping, the optimizer's launches) adds to the GPU time, where PyTorch's queue of kernels
hides it. Here each device's sessions run on one stream of their own that waits for PyTorch's current stream before
a run, and PyTorch's stream waits for it after: both waits happen on the GPU, and the run returns once its kernels
are queued (unless one of the graph's operators waits itself: docs/gpu.md). Every later PyTorch kernel on the
current stream comes after ONNX Runtime's, so inputs may be freed and outputs read there as soon as the run returns
(on another stream, make it wait for the current one first, as for any PyTorch output).
"""

import functools

import torch


def ort_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream `device`'s sessions run on (one per device, shared, so that they run in order)."""
    return _stream(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)


def provider_options(device: torch.device, **options) -> dict:
    """CUDAExecutionProvider options that put a session on `device` and its `ort_stream`."""
    stream = ort_stream(device)
    return {
        "device_id": str(stream.device.index),
        "has_user_compute_stream": "1",
        "user_compute_stream": str(stream.cuda_stream),
        **options,
    }


@functools.cache
def _run_options_without_wait():
    import onnxruntime

    run_options = onnxruntime.RunOptions()
    run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return run_options


def run_with_iobinding(session, binding, device: torch.device) -> None:
    """Queue the session's run on `device` after PyTorch's pending work and before its next, and return."""
    current, stream = torch.cuda.current_stream(device), ort_stream(device)
    stream.wait_stream(current)
    try:
        session.run_with_iobinding(binding, _run_options_without_wait())
    finally:  # a failed run may have queued kernels that still read the inputs
        current.wait_stream(stream)
