"""I/O binding of torch tensors, fast enough for graphs of a thousand inputs and outputs.

A compiled training graph binds every weight, activation and gradient at each run. The public `IOBinding` makes a
device object for each tensor it binds and a Python `OrtValue` for each output it returns: for a large model,
milliseconds of host time a run. Here each device is made once, tensors are bound through the binding's C object,
and the outputs reach torch in one call on their C vector (`to_dlpacks`). Every build from onnxruntime-training
1.19.2 to onnxruntime 1.32 has these; a build without them binds through the public API. This module is the only
place that knows them.
"""

import functools

import torch

from .inference.session import NUMPY_TYPES


def bind_inputs(binding, names: list, tensors: list) -> None:
    """Bind each tensor, in place, as the input of that name."""
    if not _has_c_binding(binding):
        for name, tensor in zip(names, tensors, strict=True):
            device = tensor.device
            binding.bind_input(
                name, device.type, device.index or 0, NUMPY_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr()
            )
        return
    bind = binding._iobinding.bind_input
    for name, tensor in zip(names, tensors, strict=True):
        bind(name, _ort_device(tensor.device), NUMPY_TYPES[tensor.dtype], tensor.shape, tensor.data_ptr())


def bind_outputs(binding, names: list, device: torch.device) -> None:
    """Bind each output to `device`, where ONNX Runtime allocates it at the run."""
    if not _has_c_binding(binding):
        for name in names:
            binding.bind_output(name, device.type, device.index or 0)
        return
    bind, ort_device = binding._iobinding.bind_output, _ort_device(device)
    for name in names:
        bind(name, ort_device)


def outputs(binding, is_bool: list) -> list:
    """The run's outputs as tensors that own their memory, without a copy. Older builds hand bool tensors over as
    uint8: `is_bool` says which outputs to view as bool."""
    if _has_c_binding(binding):
        tensors = binding._iobinding.get_outputs().to_dlpacks(torch.utils.dlpack.from_dlpack)
    else:
        tensors = [torch.utils.dlpack.from_dlpack(value._ortvalue.to_dlpack()) for value in binding.get_outputs()]
    return [
        tensor.view(torch.bool) if wanted and tensor.dtype != torch.bool else tensor
        for tensor, wanted in zip(tensors, is_bool, strict=True)
    ]


def _has_c_binding(binding) -> bool:
    return hasattr(binding, "_iobinding") and _has_c_api()


@functools.cache
def _has_c_api() -> bool:
    from onnxruntime import OrtDevice
    from onnxruntime.capi._pybind_state import OrtValueVector

    return hasattr(OrtDevice, "_get_c_device") and hasattr(OrtValueVector, "to_dlpacks")


@functools.cache
def _ort_device(device: torch.device):
    import onnxruntime

    return onnxruntime.OrtDevice.make(device.type, device.index or 0)._get_c_device()
