"""Evaluation and prediction in an `onnxruntime.InferenceSession`: export once, optimise where results stay equal,
run batches of any size and length. Works with every ONNX Runtime build (plain, -gpu, -training)."""

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import threads, transformers_compat
from .import_utils import is_onnxruntime_available, onnxruntime_providers

logger = logging.getLogger(__name__)

OPSET = 17
# Model types whose graphs ORT's transformer optimizer fuses, and the fusion recipe it uses for them.
OPTIMIZER_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert"}
# Outputs of the supported heads, and the names of their dynamic axes.
TASK_OUTPUTS = {
    "ForSequenceClassification": {"logits": {0: "batch"}},
    "ForTokenClassification": {"logits": {0: "batch", 1: "sequence"}},
}


class ONNXExportError(RuntimeError):
    """The model could not be exported to ONNX."""


def model_task(model: torch.nn.Module) -> str:
    """The head of a supported model class or its parents (e.g. "ForSequenceClassification"), or an error."""
    for cls in type(model).__mro__:
        for task in TASK_OUTPUTS:
            if cls.__name__.endswith(task):
                return task
    name = type(model).__name__
    raise ONNXExportError(
        f"`--inference_with_ort` runs sequence and token classifiers and encoder-decoder language models; {name} is "
        "none of these. "
        "To fix: evaluate it in PyTorch (drop `--inference_with_ort`)."
    )


def task_loss(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the model's own forward computes from these logits, with transformers' loss functions."""
    return transformers_compat.classification_loss(model_task(model), logits, labels, model.config)


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of the weights and config, so an exported graph is reused only while it is current."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    config = getattr(model, "config", None)
    if config is not None:
        # problem_type is set by the first loss computed and does not change the graph.
        values = {key: value for key, value in config.to_dict().items() if key != "problem_type"}
        digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def export_onnx(model: torch.nn.Module, sample_inputs: dict, path: Path) -> Path:
    """Export `model`'s inference graph with dynamic batch and sequence axes (TorchScript exporter, opset 17)."""
    outputs = TASK_OUTPUTS[model_task(model)]
    # The exporter names graph inputs in the order of `forward`'s parameters, whatever the dict's order.
    parameters = list(inspect.signature(model.forward).parameters)
    input_names = sorted(sample_inputs, key=parameters.index)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names} | outputs
    with evaluating(model):
        export_module(model, sample_inputs, input_names, list(outputs), dynamic_axes, path)
    return path


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode without gradients, for exports; the model's own mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def export_module(module, inputs, input_names: list, output_names: list, dynamic_axes: dict, path: Path) -> None:
    """`torch.onnx.export` with the TorchScript exporter (the one ORT's transformer optimizer knows), or an
    error naming what could not be exported. `inputs` are positional (a tuple) or keyword (a dict)."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # The tracer warns of every Python value it records; the graphs are tested on other shapes than traced.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module, args, str(path), kwargs=kwargs, input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        name = type(getattr(module, "model", module)).__name__
        raise ONNXExportError(
            f"Could not export {name} to ONNX for `--inference_with_ort`: {first_line.rstrip('.')}. "
            "To fix: evaluate in PyTorch (drop `--inference_with_ort`)."
        ) from error


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
        _warn_once(
            f"The model is on {device}, but the installed ONNX Runtime has no CUDAExecutionProvider: evaluating in "
            "PyTorch (`--ort_inference_without_cuda pytorch`). To evaluate with ONNX Runtime on the GPU: pip install "
            "onnxruntime-gpu."
        )
        return None
    _warn_once(
        f"The model is on {device}, but the installed ONNX Runtime has no CUDAExecutionProvider: evaluating with ONNX "
        "Runtime on the CPU. To evaluate on the GPU: pip install onnxruntime-gpu; to evaluate in PyTorch instead: "
        "`--ort_inference_without_cuda pytorch`."
    )
    return "CPUExecutionProvider"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def create_inference_session(path: Path, provider: str, device: torch.device):
    onnxruntime = _ort()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's threads spin for work after each run by default, taking the cores from the PyTorch code that runs
    # between sessions (collation, metrics, generation's search).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider_options = [{"device_id": str(device.index or 0)}] if provider == "CUDAExecutionProvider" else [{}]
    return onnxruntime.InferenceSession(str(path), options, providers=[provider], provider_options=provider_options)


@dataclass
class ONNXModel:
    """An exported model in an InferenceSession, called like the PyTorch model on a dict of tensors; returns a dict
    of its outputs, on the model's device."""

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
        """Inputs read from and outputs written to torch tensors on the GPU: no host round trip per batch."""
        binding = self.session.io_binding()
        device_id = self.device.index or 0
        for name, tensor in feeds.items():
            tensor = feeds[name] = tensor.contiguous()
            binding.bind_input(name, "cuda", device_id, _numpy_type(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        outputs = {}
        for name, (shape, dtype) in self._output_shapes(feeds).items():
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(name, "cuda", device_id, _numpy_type(dtype), shape, outputs[name].data_ptr())
        self.session.run_with_iobinding(binding)
        return outputs

    @functools.cached_property
    def _axes(self) -> tuple:
        """The inputs' axes, and the outputs' axes and types, read from the session once (it runs every step)."""
        inputs = {node.name: node.shape for node in self.session.get_inputs()}
        outputs = {node.name: (node.shape, ONNX_TYPES[node.type]) for node in self.session.get_outputs()}
        return inputs, outputs

    def _output_shapes(self, feeds: dict) -> dict:
        """Each output's shape and type, its dynamic axes sized by the inputs' axes of the same name; an axis
        named "past + step" is as long as those two together."""
        input_axes, output_axes = self._axes
        sizes = {}
        for name, axes in input_axes.items():
            sizes |= {axis: size for axis, size in zip(axes, feeds[name].shape) if isinstance(axis, str)}

        def size(axis):
            return sum(sizes[part.strip()] for part in axis.split("+")) if isinstance(axis, str) else axis

        return {name: ([size(axis) for axis in axes], dtype) for name, (axes, dtype) in output_axes.items()}


ONNX_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}


def _numpy_type(dtype: torch.dtype):
    return {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.float16: np.float16}[dtype]


FUSABLE_ATTENTION = "ort_fusable"


def _fusable_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention as BERT was first written (scores / sqrt(d), plus an additive mask): the pattern that ORT's
    transformer optimizer fuses into one Attention node. Same results as transformers' eager attention."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _fusable_padding_mask(batch_size, q_length, kv_length, *args, attention_mask=None, dtype=torch.float32, **kwargs):
    """The additive padding mask of the original BERT, `(1 - mask) * -10000`, which ORT's fusion recognises."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0


@contextlib.contextmanager
def _attention_ort_can_fuse(model):
    transformers_compat.register_attention(FUSABLE_ATTENTION, _fusable_attention, _fusable_padding_mask)
    with transformers_compat.attention(model, FUSABLE_ATTENTION):
        yield


def _name_head_count(path: Path, heads: int, head_size: int):
    """transformers reshapes to (batch, sequence, -1, head_size); ORT's fusion reads the head count from that
    shape, so the -1 becomes `heads` (the same shape)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path))
    constants = {node.output[0]: node for node in graph.graph.node if node.op_type == "Constant"}
    producers = {output: node for node in graph.graph.node for output in node.output}
    for node in graph.graph.node:
        concat = producers.get(node.input[1]) if node.op_type == "Reshape" else None
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        count, size = (constants.get(name) for name in concat.input[2:])
        if count is None or size is None:
            continue
        count_value, size_value = (numpy_helper.to_array(constant.attribute[0].t) for constant in (count, size))
        if count_value.size == 1 and int(count_value.flat[0]) == -1 and int(size_value.flat[0]) == head_size:
            count.attribute[0].t.CopyFrom(numpy_helper.from_array(np.full_like(count_value, heads)))
    onnx.save(graph, str(path))


def _optimize(path: Path, model: torch.nn.Module, sample_inputs: dict, provider: str) -> bool:
    """Fuse attention, layer norm and GELU with ORT's transformer optimizer, for the architectures it knows, from
    an export whose attention is written the way the optimizer recognises. Returns whether it wrote
    `model_optimized.onnx`."""
    config = getattr(model, "config", None)
    model_type = OPTIMIZER_MODEL_TYPES.get(getattr(config, "model_type", None))
    if model_type is None:
        return False
    from onnxruntime.transformers.optimizer import optimize_model

    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", 0)
    fusable = path.with_name("model_fusable.onnx")
    with _attention_ort_can_fuse(model):
        export_onnx(model, sample_inputs, fusable)
    _name_head_count(fusable, heads, hidden // heads)
    optimized = optimize_model(
        str(fusable), model_type=model_type, num_heads=heads, hidden_size=hidden,
        use_gpu=provider == "CUDAExecutionProvider", opt_level=0,
    )
    optimized.save_model_to_file(str(path.with_name("model_optimized.onnx")))
    fusable.unlink()
    return True


# How far fused kernels may move fp32 logits: CUDA's reorder sums more than the CPU's.
FUSION_TOLERANCE = {"CPUExecutionProvider": 1e-4, "CUDAExecutionProvider": 1e-3}


def _same_outputs(first: ONNXModel, second: ONNXModel, inputs: dict) -> bool:
    """Logits within the provider's tolerance where there are real tokens, and the same predictions wherever the
    top two logits are further apart than that tolerance (closer ones may swap within it)."""
    atol = FUSION_TOLERANCE[first.provider]
    a, b = first(inputs)["logits"].float(), second(inputs)["logits"].float()
    if a.dim() == 3 and "attention_mask" in inputs:  # per token: padding positions predict nothing
        a, b = a[inputs["attention_mask"].bool()], b[inputs["attention_mask"].bool()]
    top_two = a.topk(min(2, a.shape[-1]), dim=-1).values
    decided = (top_two[..., 0] - top_two[..., -1]) > 2 * atol
    same_predictions = torch.equal(a.argmax(-1)[decided], b.argmax(-1)[decided])
    return same_predictions and torch.allclose(a, b, atol=atol, rtol=0)


def session_target(model: torch.nn.Module, fp16: bool) -> tuple:
    """Where `model`'s sessions run: its device, the provider for it, and whether in fp16 (asked for, and on
    CUDA: CPU sessions stay fp32)."""
    device = next(model.parameters()).device
    provider = select_provider(device, onnxruntime_providers())
    return device, provider, fp16 and provider == "CUDAExecutionProvider"


def export_key(model: torch.nn.Module, **settings) -> dict:
    """What an export depends on: weights, config, the versions that wrote it, and the caller's settings."""
    from . import __version__

    return {
        "fingerprint": fingerprint(model), "opset": OPSET, "torch": torch.__version__, "ort_trainer": __version__,
    } | settings


def reuse_or_export(directory: Path, key: dict, export: Callable[[], list]) -> list:
    """The graph files recorded in `directory/model.json` if they were exported under `key` and are all there,
    else the files `export()` writes (then recorded)."""
    stamp_path = directory / "model.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    graphs = stamp.get("graphs")
    if stamp.get("key") != key or not graphs or not all((directory / graph).is_file() for graph in graphs):
        directory.mkdir(parents=True, exist_ok=True)
        stamp = {"key": key, "graphs": export()}
        stamp_path.write_text(json.dumps(stamp))
    return stamp["graphs"]


def load_onnx_model(
    model: torch.nn.Module, sample_inputs: dict, directory: Path, optimize: bool = True, fp16: bool = False
) -> ONNXModel:
    """The ONNX Runtime counterpart of a classifier, in a session: exported into `directory` (reused while the
    weights and config are unchanged), optimised when the optimised graph gives the same outputs on
    `sample_inputs`, and in fp16 when `fp16` and running on CUDA (inputs and outputs keep their types). CPU runs
    stay fp32."""
    device, provider, fp16 = session_target(model, fp16)
    directory = Path(directory)
    key = export_key(model, inputs=sorted(sample_inputs), provider=provider, optimize=optimize, fp16=fp16)

    def export() -> list:
        graph = _export_and_choose_graph(model, sample_inputs, directory, provider, device, optimize)
        return [convert_to_fp16(directory / graph) if fp16 else graph]

    (graph,) = reuse_or_export(directory, key, export)
    optimization = "transformer fusions" if "optimized" in graph else "none"
    precision = "fp16" if fp16 else "fp32"
    return ONNXModel.open(directory / graph, provider, device, f"{optimization}, {precision}")


def convert_to_fp16(path: Path) -> str:
    """Weights and compute in fp16, inputs and outputs in their own types."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    fp16_path = path.with_name(path.stem + "_fp16.onnx")
    onnx.save(converted, str(fp16_path))
    return fp16_path.name


def _export_and_choose_graph(model, sample_inputs, directory: Path, provider: str, device, optimize: bool) -> str:
    """Export, then keep the optimised graph only if it gives the exported graph's outputs."""
    path, optimized_path = directory / "model.onnx", directory / "model_optimized.onnx"
    for stale in directory.glob("model_*.onnx"):
        stale.unlink()
    export_onnx(model, sample_inputs, path)
    if not (optimize and _optimize(path, model, sample_inputs, provider)):
        return path.name
    plain, fused = (ONNXModel.open(graph, provider, device) for graph in (path, optimized_path))
    if _same_outputs(plain, fused, sample_inputs):
        return optimized_path.name
    logger.warning("ORT's transformer optimizer changed this model's outputs; evaluating the unfused graph.")
    return path.name
