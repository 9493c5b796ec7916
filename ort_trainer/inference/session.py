"""ONNX Runtime sessions: which provider runs them, fp16 graphs for CUDA, and calls on torch tensors (with I/O
binding on CUDA, so batches and caches stay on the GPU). Works with every ONNX Runtime build (plain, -gpu,
-training)."""

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import cuda_streams, threads
from ..import_utils import is_onnxruntime_available, onnxruntime_providers


logger = logging.getLogger(__name__)

# The element types sessions exchange with torch: torch's, numpy's (what I/O binding takes) and ONNX's name.
ELEMENT_TYPES = [
    (torch.float32, np.float32, "float"),
    (torch.float16, np.float16, "float16"),
    (torch.float64, np.float64, "double"),
    (torch.int64, np.int64, "int64"),
    (torch.int32, np.int32, "int32"),
    (torch.int8, np.int8, "int8"),
    (torch.uint8, np.uint8, "uint8"),
    (torch.bool, np.bool_, "bool"),
]
NUMPY_TYPES = {torch_type: numpy_type for torch_type, numpy_type, _ in ELEMENT_TYPES}
ONNX_TYPES = {f"tensor({name})": torch_type for torch_type, _, name in ELEMENT_TYPES}


def summed_axis(*names: str) -> str:
    """The name for an output axis as long as these input axes together (a cache grown by the new tokens):
    sessions size such outputs from their inputs."""
    return " + ".join(names)


def _axis_size(axis, sizes: dict) -> int:
    return sum(sizes[name] for name in axis.split(" + ")) if isinstance(axis, str) else axis


def _ort():
    if not is_onnxruntime_available():
        raise ImportError(
            "`--inference_with_ort` needs ONNX Runtime. To fix: pip install onnxruntime (or onnxruntime-gpu, "
            "or an onnxruntime-training build, which also runs inference)."
        )
    import onnxruntime

    return onnxruntime


def select_provider(device: torch.device, available: tuple, without_cuda: str = "cpu") -> str | None:
    """CUDA when the model is on a GPU and this ONNX Runtime build has it. A model on a GPU that this build cannot
    run evaluates with ONNX Runtime on the CPU (`without_cuda="cpu"`) or, for `"pytorch"`, in PyTorch: None."""
    if device.type != "cuda":
        return "CPUExecutionProvider"
    if "CUDAExecutionProvider" in available:
        return "CUDAExecutionProvider"
    if without_cuda == "pytorch":
        warn_once(
            f"The model is on {device}, but the installed ONNX Runtime has no CUDAExecutionProvider: evaluating in "
            "PyTorch (`--ort_inference_without_cuda pytorch`). To evaluate with ONNX Runtime on the GPU: pip install "
            "onnxruntime-gpu."
        )
        return None
    warn_once(
        f"The model is on {device}, but the installed ONNX Runtime has no CUDAExecutionProvider: evaluating with ONNX "
        "Runtime on the CPU. To evaluate on the GPU: pip install onnxruntime-gpu; to evaluate in PyTorch instead: "
        "`--ort_inference_without_cuda pytorch`."
    )
    return "CPUExecutionProvider"


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    logger.warning(message)


def session_target(model: torch.nn.Module, fp16: bool) -> tuple:
    """Where `model`'s sessions run: its device, the provider for it, and whether in fp16 (asked for, and on
    CUDA: CPU sessions stay fp32)."""
    device = next(model.parameters()).device
    provider = select_provider(device, onnxruntime_providers())
    return device, provider, fp16 and provider == "CUDAExecutionProvider"


def convert_to_fp16(path: Path) -> str:
    """Weights and compute in fp16, inputs and outputs in their own types. Returns the new graph's file name."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    fp16_path = path.with_name(path.stem + "_fp16.onnx")
    onnx.save(converted, str(fp16_path))
    return fp16_path.name


def create_inference_session(path: Path, provider: str, device: torch.device):
    onnxruntime = _ort()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's threads spin for work after each run by default, taking the cores from the PyTorch code that runs
    # between sessions (collation, metrics, generation's search).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider_options = cuda_streams.provider_options(device) if provider == "CUDAExecutionProvider" else {}
    return onnxruntime.InferenceSession(str(path), options, providers=[provider], provider_options=[provider_options])


@dataclass
class ONNXModel:
    """An exported graph in an InferenceSession, called on a dict of torch tensors; returns a dict of its outputs,
    on the model's device. `optimization` says how the graph was optimised and in which precision, for the log."""

    session: object
    path: Path
    provider: str
    device: torch.device
    optimization: str = ""

    @classmethod
    def open(cls, path: Path, provider: str, device: torch.device, optimization: str = ""):
        return cls(create_inference_session(path, provider, device), path, provider, device, optimization)

    @functools.cached_property
    def input_names(self) -> list:
        return [node.name for node in self.session.get_inputs()]

    @functools.cached_property
    def output_names(self) -> list:
        return [node.name for node in self.session.get_outputs()]

    def __call__(self, inputs: dict) -> dict:
        feeds = {name: inputs[name] for name in self.input_names}
        if self.provider == "CUDAExecutionProvider":
            return self._run_with_io_binding(feeds)
        threads.release_torch_threads()
        values = self.session.run(self.output_names, {name: tensor.cpu().numpy() for name, tensor in feeds.items()})
        return {name: torch.from_numpy(value).to(self.device) for name, value in zip(self.output_names, values)}

    def _run_with_io_binding(self, feeds: dict) -> dict:
        """Inputs read from and outputs written to torch tensors on the GPU: no host round trip per batch, and no
        wait for the GPU (`cuda_streams`)."""
        binding = self.session.io_binding()
        device_id = self.device.index or 0
        for name, tensor in feeds.items():
            tensor = feeds[name] = tensor.contiguous()
            binding.bind_input(
                name, "cuda", device_id, NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr()
            )
        outputs = {}
        for name, (shape, dtype) in self._output_shapes(feeds).items():
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(name, "cuda", device_id, NUMPY_TYPES[dtype], shape, outputs[name].data_ptr())
        cuda_streams.run_with_iobinding(self.session, binding, self.device)
        return outputs

    @functools.cached_property
    def _axes(self) -> tuple:
        """The inputs' axes, and the outputs' axes and types, read from the session once (it runs every step)."""
        inputs = {node.name: node.shape for node in self.session.get_inputs()}
        outputs = {node.name: (node.shape, ONNX_TYPES[node.type]) for node in self.session.get_outputs()}
        return inputs, outputs

    def _output_shapes(self, feeds: dict) -> dict:
        """Each output's shape and type, its dynamic axes sized by the inputs' axes of the same name (or, for a
        `summed_axis`, of those names together)."""
        input_axes, output_axes = self._axes
        sizes = {}
        for name, axes in input_axes.items():
            sizes |= {axis: size for axis, size in zip(axes, feeds[name].shape) if isinstance(axis, str)}
        return {
            name: ([_axis_size(axis, sizes) for axis in axes], dtype) for name, (axes, dtype) in output_axes.items()
        }
