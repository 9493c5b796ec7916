"""A `torch.compile` backend that trains in ONNX Runtime with any onnxruntime build (no onnxruntime-training).

AOTAutograd splits each captured graph into a forward graph (which also returns what backward needs) and a
backward graph; each is exported with the dynamo ONNX exporter and runs in an `onnxruntime.InferenceSession` on
the device of its inputs (CPU, or CUDA with I/O binding). The gradient graph is PyTorch's; ONNX Runtime executes it.
Exported graphs are cached on disk, keyed by the graph and the torch, onnxscript and onnxruntime versions.

Registered with dynamo as "onnxruntime", so after `import ort_trainer.compile_backend` (or through the package's
`torch_dynamo_backends` entry point) this works on its own:

    compiled = torch.compile(model, backend="onnxruntime", dynamic=False)

On CUDA, `options={"cuda_graphs": True}` replays each graph as a CUDA graph (one launch a graph, not one a kernel).
Dropout's masks are drawn by PyTorch and passed to the graphs, so torch's seed fixes them and each replay gets new
ones; graphs that draw other random numbers in ONNX Runtime are refused under CUDA graphs, since a replay repeats
the captured ones.
Shapes are static: each new input shape is a new pair of graphs. This module is the only place that knows the
torch internals the backend needs (AOTAutograd, its decompositions, dynamo's registry and recompile limits).
"""

import collections
import contextlib
import functools
import hashlib
import importlib.metadata
import itertools
import logging
import math
import os
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cuda_streams, iobinding
from .inference.session import NUMPY_TYPES, ONNX_TYPES
from .ortmodule import cache_dir


logger = logging.getLogger(__name__)

BACKEND_NAME = "onnxruntime"


@dataclass
class CompileStats:
    """What the backend did in this process: graphs exported, graphs read from the cache, ONNX Runtime runs."""

    graphs_exported: int = 0
    graphs_from_cache: int = 0
    session_runs: int = 0
    export_seconds: float = 0.0

    @property
    def graphs_built(self) -> int:
        return self.graphs_exported + self.graphs_from_cache


stats = CompileStats()


def graph_cache_dir() -> Path:
    return cache_dir() / "compiled_graphs"


def _versions() -> str:
    import onnxruntime

    onnxscript = importlib.metadata.version("onnxscript")
    return f"torch {torch.__version__}, onnxscript {onnxscript}, onnxruntime {onnxruntime.__version__}"


def _graph_key(gm: torch.fx.GraphModule, example_inputs) -> str:
    """The graph's code, its constants, its inputs' dtypes, shapes and devices, and the versions that export and
    run it: equal keys give the same ONNX graph."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    digest = hashlib.sha256(gm.code.encode())
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if torch.is_tensor(value) and not isinstance(value, FakeTensor):
                with unset_fake_temporarily():  # AOTAutograd compiles in fake mode; constants are real
                    digest.update(value.detach().cpu().numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    for value in example_inputs:
        digest.update(f"{value.dtype}{tuple(value.shape)}{tuple(value.stride())}{value.device.type};".encode())
    digest.update(_versions().encode())
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter warns about every `None` gradient and missing torchvision op; none of it is actionable here."""
    exporter_logger = logging.getLogger("torch.onnx")
    level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_logger.setLevel(level)


def _export(gm: torch.fx.GraphModule, example_inputs, path: Path):
    """Export to `path`, written atomically so that processes sharing the cache never read half a file."""
    start = time.perf_counter()
    with _quiet_exporter():
        program = torch.onnx.export(gm, tuple(example_inputs), dynamo=True, optimize=False, verbose=False)
        try:
            program.optimize()
        except Exception as error:  # onnxscript's optimizer fails on some torch versions; ORT optimises anyway
            logger.info("onnxscript could not optimise the graph (%s); exporting it unoptimised.", error)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as temporary:
        temporary.write(program.model_proto.SerializeToString())
    os.replace(temporary.name, path)
    seconds = time.perf_counter() - start
    stats.graphs_exported += 1
    stats.export_seconds += seconds
    logger.info("Exported graph %d to ONNX in %.1f s: %s", stats.graphs_built, seconds, path.name)


def _device_of(example_inputs) -> torch.device:
    """The accelerator the graph's tensors live on (a graph on CUDA may still take 0-d CPU scalars), else CPU."""
    return next((value.device for value in example_inputs if value.device.type != "cpu"), torch.device("cpu"))


def create_session(model: bytes, device: torch.device, cuda_graph: bool = False):
    """An InferenceSession of the serialised ONNX `model` for `device`: the CUDA provider on the device's
    `cuda_streams.ort_stream` for CUDA (capturing its run as a CUDA graph with `cuda_graph`), else the CPU provider."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not the unused initializers every exported graph has
    # ORT's threads would otherwise spin after each run, taking the cores from PyTorch's work in between.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device.type == "cpu":
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    if device.type != "cuda" or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise RuntimeError(
            f"The installed onnxruntime has no provider for {device}. To fix: pip install onnxruntime-gpu "
            "(alone: uninstall other onnxruntime builds first)."
        )
    cuda_options = cuda_streams.provider_options(
        device,
        enable_cuda_graph="1" if cuda_graph else "0",
        # TF32 matrix products only where PyTorch uses them (`torch.backends.cuda.matmul.allow_tf32`, `--tf32`).
        use_tf32="1" if torch.backends.cuda.matmul.allow_tf32 else "0",
    )
    return onnxruntime.InferenceSession(
        model,
        options,
        providers=[("CUDAExecutionProvider", cuda_options)],
        disabled_optimizers=["MatMulAddFusion"],  # see `_addmm_as_matmul_and_add`
    )


class ONNXRuntimeGraph:
    """One exported FX graph in an InferenceSession, called as AOTAutograd calls the graph it replaces.

    With `cuda_graph`, ONNX Runtime captures the session's first run on CUDA as a CUDA graph and replays it after:
    one launch for the whole graph instead of one per kernel. A replay reads and writes the addresses captured, so
    the inputs are copied into buffers bound once, the outputs bound once to buffers shaped from the (static) ONNX
    graph, and returned as copies (the next replay overwrites the buffers). A backward graph reads the activations
    its forward saved from the forward's output buffers instead, with no copy in, while they still hold them
    (`SavedActivations`).

    Outputs that are one of the graph's inputs are returned as that input; outputs that depend on no input (a
    constant) are computed once and returned as copies. Neither is the session's. An output that only reshapes
    another value of the graph is taken from the session as that value and reshaped in PyTorch
    (`_reshaped_outputs`)."""

    def __init__(
        self,
        path: Path,
        gm: torch.fx.GraphModule,
        example_inputs,
        cuda_graph: bool = False,
        saved_activations: "SavedActivations | None" = None,
        backward: bool = False,
        dropout_masks: list | None = None,
    ):
        import onnx
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        # AOTAutograd then passes the inputs as one list, which the call empties to free them early. An instance
        # attribute, since dynamo's wrappers copy `__dict__`.
        self._boxed_call = True
        self.device = _device_of(example_inputs)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.saved_activations = saved_activations
        self.backward = backward
        self.dropout_masks = dropout_masks or []
        # AOTAutograd passes a backward graph the activations its forward saved, then the outputs' gradients.
        placeholders = gm.graph.find_nodes(op="placeholder")
        self.reads_saved = [backward and not node.name.startswith("tangents") for node in placeholders]
        model = onnx.load(str(path))
        fx_outputs = next(node for node in gm.graph.nodes if node.op == "output").args[0]
        # Backward graphs return None for inputs without a gradient; the ONNX graph leaves them out.
        self.missing_outputs = [output is None for output in fx_outputs]
        onnx_counts = (len(model.graph.input), len(model.graph.output))
        fx_counts = (len(example_inputs), self.missing_outputs.count(False))
        if onnx_counts != fx_counts:
            raise RuntimeError(
                f"The ONNX graph {path} has {onnx_counts[0]} inputs and {onnx_counts[1]} outputs; "
                f"its FX graph has {fx_counts[0]} and {fx_counts[1]}. "
                f"To fix: delete {path} and run again."
            )
        # ONNX Runtime would return an output that is an input in the input's own memory, which is freed once the
        # call returns, and copy a constant output out with a copy that waits for the device (no CUDA graph then).
        self.passed_through = _passed_through_inputs(model.graph)
        with unset_fake_temporarily():  # AOTAutograd compiles in fake mode; these tensors are real
            self.constant_outputs = {index: value.to(self.device) for index, value in _constant_outputs(model).items()}
        for index in sorted({*self.passed_through, *self.constant_outputs}, reverse=True):
            del model.graph.output[index]
        self.output_count = fx_counts[1]
        self.input_names = [value.name for value in model.graph.input]
        self.reshaped_outputs = _reshaped_outputs(model.graph)
        self.session = None
        if model.graph.output:
            self.session = create_session(model.SerializeToString(), self.device, self.cuda_graph)
            self.output_names = [value.name for value in self.session.get_outputs()]
            self.bool_outputs = [value.type == "tensor(bool)" for value in self.session.get_outputs()]
        self._replay = None  # (binding, input buffers, output buffers, saved indices) once a CUDA graph is bound

    def __call__(self, args: list):
        inputs = [value.contiguous() for value in args] + self._draw_masks()  # kept alive until the run ends
        args.clear()
        session_outputs = iter([])
        if self.session is not None:
            session_outputs = iter(self._run_replayed(inputs) if self.cuda_graph else self._run(inputs))
            stats.session_runs += 1
        outputs = []
        for index in range(self.output_count):
            if index in self.constant_outputs:
                outputs.append(self.constant_outputs[index].clone())
            elif index in self.passed_through:
                outputs.append(inputs[self.passed_through[index]])
            else:
                outputs.append(next(session_outputs))
        outputs = iter(outputs)
        return [None if missing else next(outputs) for missing in self.missing_outputs]

    def _draw_masks(self) -> list:
        """A new mask for each dropout of the graph (`_dropout_masks_as_inputs`), drawn as PyTorch's own dropout
        draws it on the CPU: the same generator, the same masks."""
        return [
            torch.empty(shape, dtype=torch.bool, device=self.device).bernoulli_(keep)
            for shape, keep in self.dropout_masks
        ]

    def _run(self, inputs: list) -> list:
        binding = self.session.io_binding()
        iobinding.bind_inputs(binding, self.input_names, inputs)
        iobinding.bind_outputs(binding, self.output_names, self.device)  # ONNX Runtime allocates each
        self._run_binding(binding)
        return self._as_graph_outputs(iobinding.outputs(binding, self.bool_outputs))

    def _as_graph_outputs(self, session_outputs: list) -> list:
        """The session's outputs in the shapes of the graph's: each of `reshaped_outputs` viewed in its own. The
        view is `_unsafe_view`, so autograd sees a tensor of its own, as it would the session's."""
        return [
            torch.ops.aten._unsafe_view(value, self.reshaped_outputs[index])
            if index in self.reshaped_outputs
            else value
            for index, value in enumerate(session_outputs)
        ]

    def _run_replayed(self, inputs: list) -> list:
        if self._replay is None:
            self._replay = self._bind_buffers(inputs)
        binding, input_buffers, output_buffers, saved_indices = self._replay
        saved = self.saved_activations
        held = [index is not None and saved.holds(index, value) for index, value in zip(saved_indices, inputs)]
        stale = [not was_held for was_held in held]
        _copy_all(list(itertools.compress(input_buffers, stale)), list(itertools.compress(inputs, stale)))
        for index, value, was_held in zip(saved_indices, inputs, held):
            if index is not None and not was_held:
                saved.record(index, value)
        self._run_binding(binding)
        outputs = [torch.empty_like(buffer) for buffer in output_buffers]
        _copy_all(outputs, output_buffers)
        outputs = self._as_graph_outputs(outputs)
        if saved is not None and not self.backward:
            for index, output in enumerate(outputs):
                saved.record(index, output)
        return outputs

    def _run_binding(self, binding):
        if self.device.type == "cuda":
            cuda_streams.run_with_iobinding(self.session, binding, self.device)
        else:
            self.session.run_with_iobinding(binding)

    def _bind_buffers(self, inputs: list) -> tuple:
        """Input buffers on the graph's device (a 0-d CPU scalar too: a replay cannot copy from the host), or for a
        saved activation the forward's output buffer that holds it, and output buffers shaped and typed as the ONNX
        graph's outputs, bound once for every run; then the index among the forward's buffers of each input read
        from one (None for the others)."""
        saved_indices = [None] * len(inputs)
        if self.saved_activations is not None and any(self.reads_saved):
            saved_indices = self.saved_activations.indices_holding(inputs, self.reads_saved)
        input_buffers = [
            torch.empty_like(value, device=self.device) if index is None else self.saved_activations.buffers[index]
            for index, value in zip(saved_indices, inputs)
        ]
        output_buffers = [
            torch.empty(value.shape, dtype=ONNX_TYPES[value.type], device=self.device)
            for value in self.session.get_outputs()
        ]
        if self.saved_activations is not None and not self.backward:
            self.saved_activations.buffers = self._as_graph_outputs(output_buffers)
        binding = self.session.io_binding()
        iobinding.bind_inputs(binding, self.input_names, input_buffers)
        for name, buffer in zip(self.output_names, output_buffers):
            binding.bind_output(
                name,
                self.device.type,
                self.device.index or 0,
                NUMPY_TYPES[buffer.dtype],
                tuple(buffer.shape),
                buffer.data_ptr(),
            )
        return binding, input_buffers, output_buffers, saved_indices


def _copy_all(destinations: list, sources: list) -> None:
    """Each source copied into its destination, one multi-tensor launch per device and dtype rather than one per
    tensor: a graph's inputs and outputs are hundreds of tensors."""
    groups = collections.defaultdict(lambda: ([], []))
    for destination, source in zip(destinations, sources, strict=True):
        group = groups[destination.device, destination.dtype, source.device, source.dtype]
        group[0].append(destination)
        group[1].append(source)
    for group_destinations, group_sources in groups.values():
        torch._foreach_copy_(group_destinations, group_sources)


class SavedActivations:
    """The output buffers of one forward graph replayed as a CUDA graph, and the tensor each holds a copy of, for
    its backward graph: each activation the forward saved is bound there, and not copied in while its buffer still
    holds that very tensor, unchanged (same address, shape, strides and version, as autograd checks of saved
    tensors). Another forward replay before this backward overwrites the buffers; the copy is made then.

    Only saved activations are read so, each from one buffer: autograd alone holds them. Any other input is copied
    in at each replay, since tensors a user holds change in place without a version bump (weights under a fused
    optimizer, `.data`, collectives)."""

    def __init__(self):
        self.buffers = []
        self._contents = {}  # buffer index: (weak reference to the tensor, its identity when copied)

    def record(self, index: int, value: torch.Tensor) -> None:
        self._contents[index] = (weakref.ref(value), _identity(value))

    def holds(self, index: int, value: torch.Tensor) -> bool:
        reference, identity = self._contents.get(index, (lambda: None, None))
        return identity is not None and reference() is value and identity == _identity(value)

    def indices_holding(self, inputs: list, reads_saved: list) -> list:
        """For each input to read from here, the index of the buffer that holds it; None for the others."""
        indices, taken = [], set()
        for value, read_saved in zip(inputs, reads_saved, strict=True):
            held = (i for i in range(len(self.buffers)) if i not in taken and self.holds(i, value))
            index = next(held, None) if read_saved else None
            if index is not None:
                taken.add(index)
            indices.append(index)
        return indices


def _identity(value: torch.Tensor) -> tuple | None:
    if value.is_inference():  # outputs of a forward run in inference mode: no version counter, never read in place
        return None
    return value.data_ptr(), value.dtype, tuple(value.shape), value.stride(), value._version


def _constant_outputs(model) -> dict:
    """The outputs of `model` that depend on none of its inputs (T5's position buckets, GPT-2's causal mask), as
    {output index: value}, computed once on the CPU. ONNX Runtime would fold such an output into a constant and copy
    it out at each run with a copy that waits for the device, which a CUDA graph cannot capture."""
    import onnx
    import onnxruntime

    graph = model.graph
    depend_on_inputs = {value.name for value in graph.input}
    for node in graph.node:  # in topological order; a node with a subgraph may read any outer value
        if any(name in depend_on_inputs for name in node.input) or any(a.g.node or a.graphs for a in node.attribute):
            depend_on_inputs.update(node.output)
    constant = [index for index, value in enumerate(graph.output) if value.name not in depend_on_inputs]
    if not constant:
        return {}
    nodes = [node for node in graph.node if not depend_on_inputs.intersection(node.output)]
    outputs = [graph.output[index] for index in constant]
    evaluator = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "constant_outputs", [], outputs, initializer=graph.initializer),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
        functions=model.functions,
    )
    session = onnxruntime.InferenceSession(evaluator.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(None, {})
    return {index: torch.from_numpy(value) for index, value in zip(constant, values)}


def _passed_through_inputs(graph) -> dict:
    """The outputs of `graph` that are one of its inputs (through Identity nodes): {output index: input index}."""
    inputs = {value.name: index for index, value in enumerate(graph.input)}
    identities = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}
    passed_through = {}
    for index, output in enumerate(graph.output):
        name = output.name
        while name in identities:
            name = identities[name]
        if name in inputs:
            passed_through[index] = inputs[name]
    return passed_through


_RESHAPES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _reshaped_outputs(graph) -> dict:
    """The outputs of `graph` that only reshape another value, each rewritten in place into that value:
    {output index: the output's shape}. ONNX Runtime gives every output a buffer of its own, so it would copy the
    value into the reshaped output at each run (the forward's saved activations are often reshaped views, in
    PyTorch free). Only a value no other output or input shares is taken, so no two outputs share memory."""
    producers = {name: node for node in graph.node for name in node.output}
    shapes = {value.name: value for value in graph.value_info}
    taken = {value.name for value in (*graph.input, *graph.output)}
    reshaped = {}
    for index, output in enumerate(graph.output):
        source = output.name
        while source in producers and producers[source].op_type in _RESHAPES:
            source = producers[source].input[0]
        shape = _static_shape(output)
        if source == output.name or source in taken or source not in shapes or shape is None:
            continue
        if _static_shape(shapes[source]) is None:
            continue
        taken.add(source)
        output.CopyFrom(shapes[source])
        reshaped[index] = shape
    return reshaped


def _static_shape(value) -> tuple | None:
    dims = value.type.tensor_type.shape.dim
    return tuple(dim.dim_value for dim in dims) if all(dim.HasField("dim_value") for dim in dims) else None


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs,
    cuda_graph: bool = False,
    saved_activations: SavedActivations | None = None,
    backward: bool = False,
) -> ONNXRuntimeGraph:
    """AOTAutograd's compiler for forward and backward graphs: export (or reuse from the cache), then a session.
    A forward and its backward share one `saved_activations`."""
    if any(not torch.is_tensor(value) for value in example_inputs):
        raise ValueError(
            f"The `{BACKEND_NAME}` backend compiles static shapes, but this graph takes symbolic sizes. "
            "To fix: pass `dynamic=False` to `torch.compile`."
        )
    dropout_masks, example_inputs = _dropout_masks_as_inputs(gm, example_inputs)
    if cuda_graph and (random_ops := _random_ops(gm)):
        raise ValueError(
            f"A CUDA graph replays the random numbers it captured, and this graph draws some in ONNX Runtime "
            f"({', '.join(random_ops)}): each step would draw the same ones. To fix: compile without CUDA graphs."
        )
    unsupported = {str(value.dtype) for value in example_inputs if value.dtype not in NUMPY_TYPES}
    if unsupported:
        raise TypeError(
            f"The `{BACKEND_NAME}` backend cannot pass {', '.join(sorted(unsupported))} tensors to ONNX Runtime. "
            "To fix: train in float32 or float16."
        )
    path = graph_cache_dir() / f"{_graph_key(gm, example_inputs)}.onnx"
    if path.exists():
        stats.graphs_from_cache += 1
        logger.info("Graph %d read from the cache: %s", stats.graphs_built, path.name)
    else:
        _export(gm, example_inputs, path)
    return ONNXRuntimeGraph(path, gm, example_inputs, cuda_graph, saved_activations, backward, dropout_masks)


def _dropout_masks_as_inputs(gm: torch.fx.GraphModule, example_inputs) -> tuple:
    """Each dropout of the graph in training (`native_dropout`, which ONNX Runtime would run with its own random
    generators) rewritten in place to apply a mask that the graph takes as one more input, and returns as the mask
    saved for the backward. PyTorch draws the masks before each run (`ONNXRuntimeGraph._draw_masks`), so
    `torch.manual_seed` and a checkpoint's random state fix them, and a CUDA graph's replay gets new ones.
    Returns [(mask shape, keep probability)] in input order, and the example inputs with the masks' appended."""
    graph = gm.graph
    dropouts = graph.find_nodes(op="call_function", target=torch.ops.aten.native_dropout.default)
    if not dropouts:
        return [], example_inputs
    last_input = graph.find_nodes(op="placeholder")[-1]
    masks, mask_examples = [], []
    for node in dropouts:
        value, p = node.args[:2]
        if (node.args[2] if len(node.args) > 2 else node.kwargs.get("train")) is False:
            continue
        mask_example = node.meta["val"][1]
        with graph.inserting_after(last_input):
            mask = last_input = graph.placeholder(f"dropout_mask_{len(masks)}")
        mask.meta["val"] = mask_example
        with graph.inserting_before(node):
            kept = graph.call_function(torch.ops.aten.mul.Tensor, (value, mask))
            output = graph.call_function(torch.ops.aten.mul.Tensor, (kept, 1 / (1 - p) if p < 1 else 0.0))
        for user in list(node.users):  # `getitem`s: 0 the output, 1 the mask
            user.replace_all_uses_with(output if user.args[1] == 0 else mask)
            graph.erase_node(user)
        graph.erase_node(node)
        masks.append((tuple(mask_example.shape), 1 - p))
        mask_examples.append(mask_example)
    gm.recompile()
    return masks, [*example_inputs, *mask_examples]


def _random_ops(gm: torch.fx.GraphModule) -> list:
    """The graph's operators that draw random numbers in ONNX Runtime. Its CUDA kernels take their random seeds
    from the host at launch, so a captured graph would replay the same ones."""
    return sorted(
        {
            str(node.target)
            for node in gm.graph.nodes
            if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
        }
    )


def _copy_with_broadcast(destination, source, non_blocking=False):
    # The exporter translates `aten.copy` as a cast of `source`, without broadcasting it to `destination`'s shape:
    # a scalar written into a column (`shifted[:, 0] = decoder_start_token_id` in BART and T5) lost its shape.
    return source.to(dtype=destination.dtype, device=destination.device).expand(destination.shape).clone()


def _gelu_backward_in_fp16(grad, x, approximate="none"):
    """GELU's gradient in the fp16 tensors' own precision. PyTorch's decomposition computes it in fp32, which in
    ONNX Runtime (no element-wise fusion) is 14 kernels over fp32 copies of the activations; these 11 move less than
    half the bytes. Other dtypes and the tanh form keep PyTorch's decomposition."""
    from torch._decomp import decomposition_table

    if grad.dtype != torch.float16 or x.dtype != torch.float16 or approximate != "none":
        return decomposition_table[torch.ops.aten.gelu_backward.default](grad, x, approximate)
    # d/dx x·Φ(x) = Φ(x) + x·φ(x) = (1 + erf(u) + 2/√π · u · exp(-u²)) / 2, with u = x/√2
    u = x * (1 / math.sqrt(2))
    gaussian = torch.exp(u * (x * (-1 / math.sqrt(2))))
    return (grad * 0.5) * (torch.erf(u) + 1 + (u * gaussian) * (2 / math.sqrt(math.pi)))


def _softmax_backward_in_fp16(grad_output, output, dim, input_dtype):
    """Softmax's gradient on fp16 tensors (attention's, see `_attention_in_input_precision`) in fp16, as
    `output * (grad - sum(grad * output))`, the form of the fused attention kernels' backward. PyTorch's
    decomposition casts both to fp32 and back: 7 ONNX Runtime kernels over fp32 copies of every attention score
    where these 4 move a third of the bytes (the sum as `_fp16_sum`)."""
    from torch._decomp import decomposition_table

    if not grad_output.dtype == output.dtype == input_dtype == torch.float16:
        return decomposition_table[torch.ops.aten._softmax_backward_data.default](
            grad_output, output, dim, input_dtype
        )
    return output * (grad_output - (grad_output * output).sum(dim, keepdim=True))


def _fp16_sum(x, dim=None, keepdim=False, dtype=None):
    """A sum of fp16 values, accumulated in fp32 as PyTorch's: over leading or trailing dimensions (bias gradients,
    softmax's gradient) as a matrix product with ones, fp16 in and out; over others in fp32, cast back in the graph.
    The ONNX exporter would cast the whole tensor to fp32 to sum it (five times the bytes of the product), and drops
    its cast back where the sum is a graph output."""
    if x.dtype != torch.float16 or dtype is not None:
        return NotImplemented
    dim = [dim] if isinstance(dim, int) else dim
    dims = sorted({d % x.dim() for d in dim}) if dim and x.dim() else list(range(x.dim()))
    leading, trailing = dims == list(range(len(dims))), dims == list(range(x.dim() - len(dims), x.dim()))
    if not dims or x.numel() == 0 or not (leading or trailing):
        return torch.ops.aten.sum.dim_IntList(x.float(), dim, keepdim).half()
    shape = x.shape
    reduced = math.prod(shape[index] for index in dims)
    if leading:
        total = torch.ones(1, reduced, dtype=x.dtype, device=x.device) @ x.reshape(reduced, -1)
    else:
        total = x.reshape(-1, reduced) @ torch.ones(reduced, 1, dtype=x.dtype, device=x.device)
    if keepdim:
        return total.reshape([1 if index in dims else size for index, size in enumerate(shape)])
    return total.reshape([size for index, size in enumerate(shape) if index not in dims])


def _attention_in_input_precision(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """`scaled_dot_product_attention` as its math in the precision of its inputs. The fused attention kernels'
    backward has no ONNX translation, and PyTorch's own math form computes fp16 attention in fp32: fp32 matrix
    products and fp32 copies of every score, each a kernel of its own in ONNX Runtime. Here the products and the
    softmax run in the inputs' dtype (under autocast its fp16, like the fused kernels; ONNX Runtime's fp16 softmax
    accumulates in fp32). As in PyTorch's math, a row whose keys are all masked gives zeros. Float masks are
    clamped to half the dtype's lowest value, which still zeroes their weights and leaves room to add a score
    without overflowing to -inf. Grouped-query attention keeps PyTorch's math form."""
    if enable_gqa:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa=True
        )
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):  # autocast runs attention in its lower precision
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    with torch.autocast(device_type, enabled=False):  # which would compute the softmax in fp32
        scores = (query * scale) @ key.transpose(-2, -1)
        lowest = torch.finfo(scores.dtype).min
        if attn_mask is None:
            attends = None
        elif attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
            attends = attn_mask.any(-1, keepdim=True)
        else:
            scores = scores + attn_mask.to(scores.dtype).clamp(min=lowest / 2)
            attends = (attn_mask != -math.inf).any(-1, keepdim=True)
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            weights = torch.nn.functional.dropout(weights, dropout_p)
        output = weights @ value
    return output if attends is None else output.masked_fill(~attends, 0)


def _attention_in_input_precision_everywhere(gm: torch.fx.GraphModule) -> None:
    """Each `scaled_dot_product_attention` that dynamo captured in `gm`, rewritten in place to run
    `_attention_in_input_precision`."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.nn.functional.scaled_dot_product_attention:
            node.target = _attention_in_input_precision
    gm.recompile()


def _addmm_as_matmul_and_add(bias, mat1, mat2, beta=1, alpha=1):
    """A linear layer as `MatMul` then `Add` rather than ONNX `Gemm`, whose CUDA kernel first fills the output with
    the bias, row by row, in a broadcast kernel far slower than the element-wise `Add`. On CUDA the sessions keep
    ONNX Runtime from fusing the two back into a `Gemm` (`create_session`); on the CPU they are fused back."""
    if beta != 1 or alpha != 1:
        return NotImplemented
    return torch.mm(mat1, mat2) + bias


def _embedding_backward_on_cuda(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    """An embedding table's gradient, on CUDA for tables no longer than they are wide (positions, token types), as
    the product of the indices' one-hot matrix and the gradients. PyTorch's decomposition scatters each gradient row
    into the table with `ScatterND`, whose atomic additions ONNX Runtime serialises where many indices share a row
    (every token's type is 0); the product costs at most one width x width linear layer over the tokens. Other
    tables and devices keep PyTorch's decomposition."""
    from torch._decomp import decomposition_table

    width = grad_output.shape[-1]
    if grad_output.device.type != "cuda" or scale_grad_by_freq or num_weights > width:
        return decomposition_table[torch.ops.aten.embedding_dense_backward.default](
            grad_output, indices, num_weights, padding_idx, scale_grad_by_freq
        )
    return _embedding_gradient_as_product(grad_output, indices, num_weights, padding_idx)


def _embedding_gradient_as_product(grad_output, indices, num_weights: int, padding_idx: int):
    """`embedding_dense_backward` as a one-hot product: row r of the table gets the sum of the gradient rows whose
    index is r, in fp32 or wider; the padding row gets none."""
    rows = torch.arange(num_weights, device=indices.device).unsqueeze(1)
    one_hot = (indices.reshape(1, -1) == rows) & (rows != padding_idx)
    dtype = torch.promote_types(grad_output.dtype, torch.float32)
    product = one_hot.to(dtype) @ grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)
    return product.to(grad_output.dtype)


def _aot_autograd_backend(gm: torch.fx.GraphModule, example_inputs, cuda_graphs: bool):
    from torch._decomp import core_aten_decompositions
    from torch._dynamo.backends.common import aot_autograd

    compiler = functools.partial(compile_graph, cuda_graph=cuda_graphs, saved_activations=SavedActivations())
    decompositions = {
        **core_aten_decompositions(),
        torch.ops.aten.copy.default: _copy_with_broadcast,
        torch.ops.aten.gelu_backward.default: _gelu_backward_in_fp16,
        torch.ops.aten._softmax_backward_data.default: _softmax_backward_in_fp16,
        torch.ops.aten.sum.dim_IntList: _fp16_sum,
        torch.ops.aten.addmm.default: _addmm_as_matmul_and_add,
        torch.ops.aten.embedding_dense_backward.default: _embedding_backward_on_cuda,
    }
    backend = aot_autograd(
        fw_compiler=compiler, bw_compiler=functools.partial(compiler, backward=True), decompositions=decompositions
    )
    return backend(gm, example_inputs)


def onnxruntime_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    """The dynamo backend. `torch.compile(..., options={"cuda_graphs": True})` replays each graph on CUDA as a
    CUDA graph. Attention traces as its math (matmuls and softmax), whose backward exports; the fused CPU and CUDA
    attention kernels' backward ops have no ONNX translation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    options = dict(options or {})
    cuda_graphs = bool(options.pop("cuda_graphs", False))
    if options:
        raise ValueError(
            f"The `{BACKEND_NAME}` backend takes the option `cuda_graphs`, not {', '.join(sorted(options))}."
        )
    _attention_in_input_precision_everywhere(gm)
    with sdpa_kernel([SDPBackend.MATH]):
        return _aot_autograd_backend(gm, example_inputs, cuda_graphs)


def _register():
    from torch._dynamo.backends.registry import list_backends, register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):
        register_backend(onnxruntime_backend, name=BACKEND_NAME)


_register()


def seed_random_generators(seed: int) -> None:
    """Seed ONNX Runtime's random generators, which torch's seed does not reach, for random operators other than
    dropout (whose masks PyTorch draws). Only `onnxruntime-training` ties the two, on its import."""
    import onnxruntime

    onnxruntime.set_seed(seed)


def compile_model(model: torch.nn.Module, cuda_graphs: bool = False) -> torch.nn.Module:
    """`model` compiled for training in ONNX Runtime, static shapes (on CUDA replayed as CUDA graphs with
    `cuda_graphs`). The model's own state_dict keys stay as they are: the compiled wrapper is a separate module.
    Graph breaks are allowed: code dynamo cannot capture (such as DeBERTa's data-dependent loss branch) runs in
    PyTorch between ONNX Runtime graphs."""
    options = {"cuda_graphs": True} if cuda_graphs else None
    return torch.compile(model, backend=onnxruntime_backend, dynamic=False, options=options)


def graph_limits(max_graphs: int):
    """While active, a model compiled for more than `max_graphs` shapes raises, where dynamo would otherwise run it
    in PyTorch from then on, silently."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(
        recompile_limit=max(dynamo_config.recompile_limit, max_graphs), fail_on_recompile_limit_hit=True
    )


def describe_failure(model: torch.nn.Module, error: BaseException) -> str:
    """A sentence saying why the compile backend could not train `model`: the first line of the root error."""
    # dynamo wraps the backend's error, the exporter wraps the error of the step that failed: the root says why.
    while getattr(error, "inner_exception", None) is not None or error.__cause__ is not None:
        error = getattr(error, "inner_exception", None) or error.__cause__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return (
        f"ONNX Runtime (compile backend) could not train {type(uncompiled(model)).__name__}: {lines[0].rstrip('.')}."
    )


def is_compiled(model: torch.nn.Module) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule)


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    return model._orig_mod if is_compiled(model) else model
