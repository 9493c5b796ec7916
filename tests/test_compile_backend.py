"""The compile backend on its own and in ORTTrainer: graphs really run in ONNX Runtime, shapes stay bounded, the
graph cache is reused, checkpoints are plain and resume exactly, failures are said in one line."""

import math

import onnx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from ort_trainer import ORTTrainer, ORTTrainingArguments, compile_backend, iobinding, transformers_compat
from ort_trainer.ortmodule import ORTTrainingError

from .tiny_models import tiny_dataset, tiny_model


@pytest.fixture(autouse=True)
def graph_cache(tmp_path, monkeypatch):
    """A fresh graph cache for each test, so exports and cache reads are counted from zero."""
    monkeypatch.setenv("ORT_TRAINER_CACHE", str(tmp_path / "cache"))
    torch._dynamo.reset()
    return tmp_path / "cache" / "compiled_graphs"


def bert_trainer(args):
    return ORTTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"))


def compile_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        ort_fallback="error",
        save_strategy="no",
        ort_backend="compile",
    )
    values.update(overrides)
    return ORTTrainingArguments(**values)


@pytest.mark.parametrize("binding", ["c", "public"])
def test_torch_compile_with_the_registered_backend_name_matches_eager(binding, monkeypatch):
    """Through I/O binding's C object (every supported onnxruntime build has it), or its public API where a build
    lacks it."""
    answers, has_c_binding = [], iobinding._has_c_binding
    monkeypatch.setattr(
        iobinding,
        "_has_c_binding",
        lambda value: answers.append(binding == "c" and has_c_binding(value)) or answers[-1],
    )
    data = tiny_dataset("bert")
    batch = {key: torch.stack([row[key] for row in data[:8]]) for key in data[0]}
    eager, compiled_model = tiny_model("bert"), tiny_model("bert")
    compiled = torch.compile(compiled_model, backend="onnxruntime", dynamic=False)
    runs = compile_backend.stats.session_runs
    eager(**batch).loss.backward()
    loss = compiled(**batch).loss
    loss.backward()
    assert compile_backend.stats.session_runs - runs == 2  # forward and backward, both in ONNX Runtime
    assert answers and set(answers) == {binding == "c"}
    assert loss.item() == pytest.approx(eager(**batch).loss.item(), abs=1e-6)
    for (name, parameter), reference in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, reference.grad, atol=1e-6, rtol=0, msg=name)


def test_second_run_reads_every_graph_from_the_cache(tmp_path, graph_cache, caplog):
    first = bert_trainer(compile_args(tmp_path, max_steps=2))
    metrics = first.train().metrics
    assert metrics["ort_graphs"] >= 2 and metrics["ort_export_seconds"] > 0
    exported = compile_backend.stats.graphs_exported
    assert {path.suffix for path in graph_cache.iterdir()} == {".onnx"}  # no temporary file left behind

    torch._dynamo.reset()  # as in a new process: dynamo traces again, the export is what the cache saves
    second = bert_trainer(compile_args(tmp_path, max_steps=2))
    with caplog.at_level("INFO", logger="ort_trainer"):
        metrics = second.train().metrics
    assert compile_backend.stats.graphs_exported == exported
    assert metrics["ort_export_seconds"] == 0
    assert "(0 exported in 0.0 s, " in caplog.text
    assert "Training backend: ONNX Runtime (compile backend, CPUExecutionProvider, fp32) on cpu: " in caplog.text


def padded_to(rows, width, seed=0):
    """The rows cut to random real lengths and padded back to `width`, as a collator padding to max length does."""
    generator = torch.Generator().manual_seed(seed)
    padded = []
    for row in rows:
        length = int(torch.randint(3, width + 1, (1,), generator=generator))
        ids = torch.nn.functional.pad(row["input_ids"][:length], (0, width - length), value=0)
        mask = (torch.arange(width) < length).long()
        padded.append({"input_ids": ids, "attention_mask": mask, "labels": row["labels"]})
    return padded


def test_trimmed_lengths_share_a_few_graphs_and_train_like_pytorch(tmp_path):
    rows = [dict(row, input_ids=torch.cat([row["input_ids"]] * 4)) for row in tiny_dataset("bert", size=48)]
    data = padded_to(rows, width=48)
    common = dict(
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        seed=0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    reference = Trainer(
        model=tiny_model("bert"),
        args=TrainingArguments(output_dir=str(tmp_path / "torch"), **common),
        train_dataset=data,
    )
    reference.train()
    ort = ORTTrainer(model=tiny_model("bert"), args=compile_args(tmp_path, **common), train_dataset=data)
    graphs = ort.train().metrics["ort_graphs"]
    # Real lengths 3..48 round up to 32 or 64 columns: at most two shapes, a forward and a backward graph each,
    # and one more trace of the first shape after BERT sets `config.problem_type` (read from the cache).
    assert graphs <= 6
    losses = [entry["loss"] for entry in ort.state.log_history if "loss" in entry]
    reference_losses = [entry["loss"] for entry in reference.state.log_history if "loss" in entry]
    assert losses == pytest.approx(reference_losses, abs=1e-4)


def test_checkpoints_are_plain_and_resume_matches_an_uninterrupted_run(tmp_path):
    """With dropout on: the checkpoint's random state gives the resumed run the masks the uninterrupted one drew."""

    def bert_trainer(args):
        model = with_dropout(tiny_model("bert"), 0.2)
        return ORTTrainer(model=model, args=args, train_dataset=tiny_dataset("bert"))

    full = bert_trainer(compile_args(tmp_path / "full", max_steps=6))
    full.train()
    args = compile_args(tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=3)
    interrupted = bert_trainer(args)
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-3"
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert set(reloaded.state_dict()) == set(tiny_model("bert").state_dict())  # no `_orig_mod.` prefix

    runs = compile_backend.stats.session_runs
    resumed = bert_trainer(args)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert compile_backend.stats.session_runs - runs == 2 * 3  # steps 4 to 6, in ONNX Runtime
    final = full.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, final[key], atol=1e-5, rtol=0, msg=key)


def test_loss_inside_the_graph_matches_pytorch(tmp_path):
    common = dict(max_steps=3, label_smoothing_factor=0.1)
    reference = Trainer(
        model=tiny_model("bert"),
        args=TrainingArguments(
            output_dir=str(tmp_path / "torch"),
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            seed=0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            **common,
        ),
        train_dataset=tiny_dataset("bert"),
    )
    reference.train()
    runs = compile_backend.stats.session_runs
    ort = ORTTrainer(
        model=tiny_model("bert"),
        args=compile_args(tmp_path, use_module_with_loss=True, **common),
        train_dataset=tiny_dataset("bert"),
    )
    ort.train()
    compiled = ort.accelerator.unwrap_model(ort.model_wrapped)
    assert type(compile_backend.uncompiled(compiled)).__name__ == "_ModelWithLoss"
    assert compile_backend.stats.session_runs - runs >= 2 * 3
    for key, value in ort.model.state_dict().items():
        torch.testing.assert_close(value, reference.model.state_dict()[key], atol=1e-4, rtol=0, msg=key)


class CumulativeMaxClassifier(torch.nn.Module):
    """Uses `cummax`, which the ONNX exporter has no translation for."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(96, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embedding(input_ids).cummax(1).values[:, -1])
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_model_the_exporter_cannot_translate_fails_in_one_line(tmp_path):
    args = compile_args(tmp_path, max_steps=2)
    trainer = ORTTrainer(model=CumulativeMaxClassifier(), args=args, train_dataset=tiny_dataset("bert"))
    with pytest.raises(ORTTrainingError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        "ONNX Runtime (compile backend) could not train CumulativeMaxClassifier: No ONNX function found for "
        "<OpOverload(op='aten.cummax', overload='default')>."
    )
    assert message.endswith(
        "To fix: pass `--ort_fallback pytorch` to train in PyTorch when ORT cannot, or `--use_ort False`."
    )


def test_model_the_exporter_cannot_translate_falls_back_to_pytorch(tmp_path, caplog):
    args = compile_args(tmp_path, max_steps=2, ort_fallback="pytorch")
    trainer = ORTTrainer(model=CumulativeMaxClassifier(), args=args, train_dataset=tiny_dataset("bert"))
    with caplog.at_level("WARNING", logger="ort_trainer"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert "could not train CumulativeMaxClassifier: No ONNX function found" in caplog.text
    assert "Training backend: PyTorch on cpu, not ONNX Runtime." in caplog.text


def test_auto_backend_keeps_ortmodule_where_onnxruntime_training_is_installed(tmp_path):
    from ort_trainer.import_utils import is_onnxruntime_training_available

    backend, reason = compile_args(tmp_path, ort_backend="auto").training_backend()
    assert backend == ("ortmodule" if is_onnxruntime_training_available() else "compile")
    assert reason.startswith("`--ort_backend auto` with onnxruntime")


def test_unknown_backend_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^`--ort_backend` must be one of auto, ortmodule, compile, got `dort`\.$"):
        compile_args(tmp_path, ort_backend="dort")


def test_cuda_graphs_on_cpu_are_refused_in_one_line(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^`--ort_cuda_graphs` replays the compile backend's graphs on CUDA, but this run trains with compile "
        r"on cpu\. To fix: drop `--ort_cuda_graphs`, or train on a GPU with `--ort_backend compile`\.$",
    ):
        compile_args(tmp_path, ort_cuda_graphs=True)


def test_unknown_backend_option_is_named():
    data = tiny_dataset("bert")
    batch = {key: torch.stack([row[key] for row in data[:8]]) for key in data[0]}
    compiled = torch.compile(tiny_model("bert"), backend="onnxruntime", dynamic=False, options={"cuda_graph": True})
    with pytest.raises(Exception, match="The `onnxruntime` backend takes the option `cuda_graphs`, not cuda_graph"):
        compiled(**batch)


def test_one_shape_builds_one_forward_and_one_backward_graph(tmp_path):
    trainer = bert_trainer(compile_args(tmp_path, max_steps=3))
    assert trainer.model.config.problem_type is None  # chosen by the model on its first batch
    metrics = trainer.train().metrics
    assert metrics["ort_graphs"] == 2  # no second trace when the first forward sets the problem type
    assert trainer.model.config.problem_type == "single_label_classification"


def test_a_constant_output_comes_from_the_backend_not_the_session(monkeypatch):
    """A graph output that depends on no input (T5's position buckets, GPT-2's causal mask) is returned by the
    backend: ONNX Runtime would copy it into its output with a copy that waits for the device, which a CUDA graph
    cannot capture. Each call returns a tensor of its own."""

    class Positions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, inputs):
            return self.linear(inputs).sum(), torch.arange(6).view(2, 3) * 2

    graphs, create = [], compile_backend.ONNXRuntimeGraph.__init__
    monkeypatch.setattr(
        compile_backend.ONNXRuntimeGraph,
        "__init__",
        lambda graph, *args, **kwargs: create(graph, *args, **kwargs) or graphs.append(graph),
    )
    model = Positions()
    compiled = compile_backend.compile_model(model)
    loss, positions = compiled(torch.ones(2, 4))
    loss.backward()
    forward = graphs[0]
    assert list(forward.constant_outputs) == [1]
    assert len(forward.output_names) == 1  # the loss; not the constant, nor the input saved for the backward
    torch.testing.assert_close(positions, torch.arange(6).view(2, 3) * 2)
    torch.testing.assert_close(model.linear.weight.grad, torch.full((4, 4), 2.0))
    positions.add_(1)
    torch.testing.assert_close(compiled(torch.ones(2, 4))[1], torch.arange(6).view(2, 3) * 2)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_attention_rows_with_every_key_masked_are_zero_as_in_pytorch(mask_kind):
    """Attention's math sets rows whose keys are all masked (False, or -inf in a float mask) to zero instead of
    NaN; the backend keeps that, with the same outputs and gradients as PyTorch for masked and unmasked rows."""

    def attention(query, key, value, mask):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True  # every row sees the first key,
    mask[0, :, 1] = False  # but row 1 of the first sequence sees none
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, -math.inf) + torch.rand(mask.shape)
    compiled = torch.compile(attention, backend="onnxruntime", dynamic=False)
    runs = compile_backend.stats.session_runs
    output = compiled(query, key, value, mask)
    output.pow(2).sum().backward()
    assert compile_backend.stats.session_runs - runs == 2
    gradients = [tensor.grad for tensor in (query, key, value)]
    for tensor in (query, key, value):
        tensor.grad = None
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        reference = attention(query, key, value, mask)
    reference.pow(2).sum().backward()
    assert output[0, :, 1].eq(0).all() and not output.isnan().any()
    torch.testing.assert_close(output, reference, atol=1e-6, rtol=0)
    for gradient, tensor in zip(gradients, (query, key, value), strict=True):
        torch.testing.assert_close(gradient, tensor.grad, atol=1e-6, rtol=0)


def test_gelu_gradient_of_fp16_activations_is_computed_in_fp16_close_to_pytorch(graph_cache):
    """GELU's gradient on fp16 tensors (the MLP of every BERT-like model under fp16 autocast) runs in fp16, with no
    cast to fp32 in the graph, within fp16 rounding of PyTorch's fused kernel."""
    torch.manual_seed(0)
    x = (torch.randn(64, 256) * 3).half().requires_grad_()
    upstream = torch.randn(64, 256).half()
    compiled = torch.compile(torch.nn.functional.gelu, backend="onnxruntime", dynamic=False)
    runs = compile_backend.stats.session_runs
    compiled(x).backward(upstream)
    assert compile_backend.stats.session_runs - runs == 2
    gradient, x.grad = x.grad, None
    torch.nn.functional.gelu(x).backward(upstream)
    assert gradient.dtype == torch.float16
    torch.testing.assert_close(gradient, x.grad, atol=1e-2, rtol=1e-2)
    graphs = [onnx.load(path) for path in graph_cache.glob("*.onnx")]
    operators = [{node.op_type for node in graph.graph.node} for graph in graphs]
    assert len(graphs) == 2 and any("Erf" in ops for ops in operators)  # the backward graph holds the gradient
    assert not any("Cast" in ops for ops in operators)


def test_fp16_sums_are_products_accumulated_in_fp32_as_pytorchs(graph_cache):
    """Sums of fp16 values over leading dimensions (bias gradients) or trailing ones (softmax's gradient) run as
    products with ones, accumulated in fp32 as PyTorch's fp16 sums are, with no cast of the summed tensor to fp32;
    other sums run in fp32 and come back as fp16, a graph output too."""

    def sums(x):
        return x.sum(0), x.sum(-1, keepdim=True), x.sum((0, 1)), x.sum(1)

    torch.manual_seed(0)
    x = (torch.randn(4096, 8, 16) + 1).half().requires_grad_()  # 4096 values ~1: an fp16 accumulator would drift
    compiled = torch.compile(sums, backend="onnxruntime", dynamic=False)
    runs = compile_backend.stats.session_runs
    totals = compiled(x)
    sum(total.float().sum() for total in totals).backward()
    assert compile_backend.stats.session_runs - runs == 2
    for total, reference in zip(totals, sums(x.detach()), strict=True):
        assert total.dtype == torch.float16 and total.shape == reference.shape
        torch.testing.assert_close(total, reference, atol=0, rtol=2e-3)  # fp16 rounding of the same fp32 sum
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))
    (forward,) = [onnx.load(path).graph for path in graph_cache.glob("*.onnx") if "ReduceSum" in str(onnx.load(path))]
    assert sum(node.op_type == "MatMul" for node in forward.node) == 3
    assert [node.op_type for node in forward.node].count("ReduceSum") == 1  # over the middle dimension
    assert [node.op_type for node in forward.node].count("Cast") == 2  # its input to fp32, its output back


def test_attention_of_fp16_inputs_runs_in_fp16_close_to_pytorch(graph_cache):
    """Attention on fp16 inputs (every SDPA model under fp16 autocast) runs its matrix products and softmax in
    fp16 in both graphs (PyTorch's math form would run them in fp32), within fp16 rounding of that math; a row with
    every key masked stays zero."""

    def attention(query, key, value, mask):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 4, 16, 8).half().requires_grad_() for _ in range(3))
    mask = torch.rand(2, 1, 16, 16) > 0.3
    mask[..., 0] = True
    mask[1, :, 3] = False
    upstream = torch.randn(2, 4, 16, 8).half()
    compiled = torch.compile(attention, backend="onnxruntime", dynamic=False)
    runs = compile_backend.stats.session_runs
    output = compiled(query, key, value, mask)
    output.backward(upstream)
    assert compile_backend.stats.session_runs - runs == 2
    assert output.dtype == torch.float16 and output[1, :, 3].eq(0).all()
    references = [tensor.detach().float().requires_grad_() for tensor in (query, key, value)]
    reference = attention(*references, mask)
    reference.backward(upstream.float())
    torch.testing.assert_close(output.float(), reference, atol=2e-3, rtol=2e-3)
    for tensor, exact in zip((query, key, value), references, strict=True):
        torch.testing.assert_close(tensor.grad.float(), exact.grad, atol=5e-3, rtol=5e-3)
    graphs = [onnx.load(path).graph for path in graph_cache.glob("*.onnx")]
    assert len(graphs) == 2
    for graph in graphs:
        values = (*graph.input, *graph.value_info, *graph.output)
        types = {value.name: value.type.tensor_type.elem_type for value in values}
        computed = [types[name] for node in graph.node if node.op_type in ("MatMul", "Softmax") for name in node.input]
        assert computed and set(computed) == {onnx.TensorProto.FLOAT16}


def test_embedding_gradient_as_a_one_hot_product_matches_pytorch(graph_cache, monkeypatch):
    """On CUDA, small tables' gradients (positions, token types) are the one-hot product, not ScatterND's atomic
    additions: the same sums, no row for the padding index. Run here on the CPU's sessions, as CUDA would."""
    monkeypatch.setattr(
        compile_backend,
        "_embedding_backward_on_cuda",
        lambda grad, indices, rows, padding_idx, by_frequency: compile_backend._embedding_gradient_as_product(
            grad, indices, rows, padding_idx
        ),
    )
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(6, 8, padding_idx=1)
    indices = torch.randint(0, 6, (4, 12))
    upstream = torch.randn(4, 12, 8)
    compiled = torch.compile(embedding, backend="onnxruntime", dynamic=False)
    runs = compile_backend.stats.session_runs
    compiled(indices).backward(upstream)
    assert compile_backend.stats.session_runs - runs == 2
    gradient, embedding.weight.grad = embedding.weight.grad, None
    embedding(indices).backward(upstream)
    torch.testing.assert_close(gradient, embedding.weight.grad, atol=1e-6, rtol=1e-6)
    assert gradient[1].eq(0).all() and indices.eq(1).any()
    operators = {node.op_type for path in graph_cache.glob("*.onnx") for node in onnx.load(path).graph.node}
    assert "MatMul" in operators and "ScatterND" not in operators


@pytest.mark.parametrize(
    ("device", "rows", "scale_grad_by_freq", "as_product"),
    [("cuda", 16, False, True), ("cuda", 17, False, False), ("cuda", 2, True, False), ("cpu", 2, False, False)],
)
def test_embedding_gradient_is_a_product_only_for_small_tables_on_cuda(
    monkeypatch, device, rows, scale_grad_by_freq, as_product
):
    """The product for tables no longer than they are wide, on CUDA; PyTorch's ScatterND decomposition for the word
    table, the CPU, and gradients scaled by frequency. Fake tensors: CUDA tensors without a GPU, traced only."""
    from torch._decomp import decomposition_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    scattered = []
    monkeypatch.setitem(
        decomposition_table,
        torch.ops.aten.embedding_dense_backward.default,
        lambda grad, indices, rows, *flags: scattered.append(rows) or grad.new_zeros(rows, grad.shape[-1]),
    )
    with FakeTensorMode():
        grad = torch.empty(4, 8, 16, device=device)
        gradient = compile_backend._embedding_backward_on_cuda(
            grad, torch.zeros(4, 8, dtype=torch.long, device=device), rows, -1, scale_grad_by_freq
        )
    assert gradient.shape == (rows, 16) and gradient.device.type == device
    assert scattered == ([] if as_product else [rows])


@pytest.mark.parametrize("onnxscript_optimizer", ["runs", "fails"])
def test_an_input_saved_for_backward_outlives_the_call(monkeypatch, onnxscript_optimizer):
    """The forward graph returns the layer's input for the backward; where onnxscript's optimizer fails (torch
    2.11) that output is the graph's input itself, which ONNX Runtime would hand back in the input's own memory,
    reused once the caller frees the input. The backend returns the input tensor instead, which keeps it alive."""
    if onnxscript_optimizer == "fails":
        monkeypatch.setattr(torch.onnx.ONNXProgram, "optimize", lambda program: 1 / 0)
    model = torch.nn.Linear(4, 4)
    compiled = compile_backend.compile_model(model)
    runs = compile_backend.stats.session_runs
    loss = compiled(torch.ones(2, 4)).sum()  # the input is freed here, as far as the caller knows
    reuse = [torch.full((2, 4), -1.0) for _ in range(64)]  # noqa: F841  (takes the freed memory, if free)
    loss.backward()
    assert compile_backend.stats.session_runs - runs == 2
    torch.testing.assert_close(model.weight.grad, torch.full((4, 4), 2.0))


def collect_graphs(monkeypatch, bound_once: bool) -> list:
    """The graphs the backend builds from now on, collected; with `bound_once`, each takes the path CUDA graphs
    take (inputs and outputs in buffers bound once, copies in and out) on the CPU, with plain CPU sessions."""
    graphs, init = [], compile_backend.ONNXRuntimeGraph.__init__

    def collected(graph, *args, **kwargs):
        init(graph, *args, **kwargs)
        graph.cuda_graph = bound_once
        graphs.append(graph)

    monkeypatch.setattr(compile_backend.ONNXRuntimeGraph, "__init__", collected)
    return graphs


@pytest.fixture
def bound_once_on_cpu(monkeypatch):
    return collect_graphs(monkeypatch, bound_once=True)


RESHAPES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


@pytest.mark.parametrize("run", ["per run", "bound once"])
def test_outputs_that_reshape_a_value_are_that_value_of_the_session_viewed_in_pytorch(graph_cache, monkeypatch, run):
    """ONNX Runtime gives each output a buffer of its own, so an output that reshapes another value (most saved
    activations are reshaped views) would cost a copy at each run. The session returns the value itself instead,
    PyTorch views it in the graph's shape, and the gradients are eager's, also from buffers bound once."""
    graphs = collect_graphs(monkeypatch, bound_once=run == "bound once")
    data = tiny_dataset("bert")
    batch = {key: torch.stack([row[key] for row in data[:8]]) for key in data[0]}
    eager, model = tiny_model("bert"), tiny_model("bert")
    for module in (eager, model):
        transformers_compat.settle_problem_type(module, batch["labels"])  # one pair of graphs
    compiled = compile_backend.compile_model(model)
    runs = compile_backend.stats.session_runs
    for _ in range(2):
        model.zero_grad()
        eager.zero_grad()
        compiled(**batch).loss.backward()
        eager(**batch).loss.backward()
        for (name, parameter), reference in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(parameter.grad, reference.grad, atol=1e-6, rtol=0, msg=name)

    assert compile_backend.stats.session_runs - runs == 4 and len(graphs) == 2
    exported = [onnx.load(path).graph for path in graph_cache.glob("*.onnx")]
    for graph in graphs:
        onnx_graph = next(g for g in exported if [value.name for value in g.input] == graph.input_names)
        producers = {name: node.op_type for node in onnx_graph.node for name in node.output}
        session_outputs = [value.name for value in graph.session.get_outputs()]
        assert len(graph.reshaped_outputs) >= 2, "backward" if graph.backward else "forward"
        assert not any(producers[session_outputs[index]] in RESHAPES for index in graph.reshaped_outputs)


@pytest.mark.parametrize("order", ["backwards in reverse", "backwards in order"])
def test_backward_reads_what_the_forward_saved_from_the_forwards_buffers(bound_once_on_cpu, order):
    """Under CUDA graphs the backward reads the activations the forward saved from the forward's own buffers, with
    no copy; where a second forward overwrote them before the first backward, or the other backward copied its own
    back, the saved copies are copied back."""
    data = tiny_dataset("bert")
    batches = [{key: torch.stack([row[key] for row in rows]) for key in data[0]} for rows in (data[:8], data[8:16])]
    eager, model = tiny_model("bert"), tiny_model("bert")
    for module in (eager, model):
        transformers_compat.settle_problem_type(module, batches[0]["labels"])  # one pair of graphs
    compiled = compile_backend.compile_model(model, cuda_graphs=True)

    def check_gradients(compiled_loss, batch):
        model.zero_grad()
        eager.zero_grad()
        compiled_loss.backward()
        eager(**batch).loss.backward()
        for (name, parameter), reference in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(parameter.grad, reference.grad, atol=1e-6, rtol=0, msg=name)

    for batch in batches + batches:
        check_gradients(compiled(**batch).loss, batch)
    forward, backward = bound_once_on_cpu
    forward_outputs, backward_inputs = forward.saved_activations.buffers, backward._replay[1]
    read_from_forward = [any(buffer is output for output in forward_outputs) for buffer in backward_inputs]
    assert read_from_forward == [index is not None for index in backward._replay[3]]
    assert sum(read_from_forward) > len(forward_outputs) // 2
    assert len({id(buffer) for buffer in backward_inputs}) == len(backward_inputs)  # each buffer bound once

    losses = [compiled(**batch).loss for batch in batches]  # the second forward overwrites the first one's buffers
    pairs = list(zip(losses, batches, strict=True))
    for loss, batch in reversed(pairs) if order == "backwards in reverse" else pairs:
        check_gradients(loss, batch)


def test_weights_updated_by_a_fused_optimizer_are_copied_in_at_each_step(bound_once_on_cpu):
    """A fused optimizer updates the weights without bumping their version counters: the forward graph, replayed
    from buffers bound once, still reads each step's weights."""
    data = tiny_dataset("bert")
    batch = {key: torch.stack([row[key] for row in data[:8]]) for key in data[0]}
    losses = {}
    for name in ("eager", "compiled"):
        model = tiny_model("bert")
        transformers_compat.settle_problem_type(model, batch["labels"])
        step = compile_backend.compile_model(model, cuda_graphs=True) if name == "compiled" else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        losses[name] = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = step(**batch).loss
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert len(bound_once_on_cpu) == 2
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-5)


def test_tensors_passed_between_graphs_are_copied_in_even_when_changed_unseen(bound_once_on_cpu):
    """A tensor one graph returns and the next reads may change in place without a version bump (`.data`, as
    collectives and custom kernels do) or take new memory (`.data =`): the next graph still reads its values."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    compiled_first, compiled_second = (
        compile_backend.compile_model(layer, cuda_graphs=True) for layer in (first, second)
    )
    inputs = torch.randn(64, 64)
    runs = compile_backend.stats.session_runs
    for change in (
        lambda hidden: hidden,
        lambda hidden: hidden.data.mul_(2),
        lambda hidden: hidden.data.copy_(inputs),
        lambda hidden: setattr(hidden, "data", hidden.data * 3),  # new memory, the old freed
    ):
        for layer in (first, second):
            layer.zero_grad()
        hidden = compiled_first(inputs)
        change(hidden)
        compiled_second(hidden).sum().backward()
        gradients = [layer.weight.grad.clone() for layer in (first, second)]
        for layer in (first, second):
            layer.zero_grad()
        hidden = first(inputs)
        change(hidden)
        second(hidden).sum().backward()
        for gradient, layer in zip(gradients, (first, second)):
            torch.testing.assert_close(gradient, layer.weight.grad, atol=1e-5, rtol=0)
    assert len(bound_once_on_cpu) == 4
    assert compile_backend.stats.session_runs - runs == 4 * 4  # each change: two forwards, two backwards


def test_gradients_of_two_outputs_are_read_apart_even_when_one_tensor_at_first(bound_once_on_cpu):
    """The outputs' gradients are never read from another graph's buffer in place: at the first step both are the
    one tensor that the next layer's backward graph returned, at the second they differ."""

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, inputs):
            return self.left(inputs), self.right(inputs)

    torch.manual_seed(0)
    eager, model = (
        torch.nn.ModuleList([TwoHeads(), torch.nn.Linear(4, 4)]),
        torch.nn.ModuleList([TwoHeads(), torch.nn.Linear(4, 4)]),
    )
    model.load_state_dict(eager.state_dict())
    compiled = [compile_backend.compile_model(module, cuda_graphs=True) for module in model]
    inputs, weights = torch.randn(2, 4), torch.randn(2, 4)
    runs = compile_backend.stats.session_runs
    for combine in (lambda left, right: left + right, lambda left, right: left + 3 * right):
        for heads, layer in (compiled, eager):
            heads.zero_grad()
            layer.zero_grad()
            (layer(combine(*heads(inputs))) * weights).sum().backward()
        for (name, parameter), reference in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(parameter.grad, reference.grad, atol=1e-6, rtol=0, msg=name)
    assert compile_backend.stats.session_runs - runs == 2 * 4  # each step: two forwards, two backwards
    heads_backward = bound_once_on_cpu[-1]  # built last, as the backward runs last
    assert heads_backward.backward and heads_backward._replay[3][-2:] == [None, None]


def test_inputs_made_in_inference_mode_are_always_copied_in(bound_once_on_cpu):
    """Inference tensors keep no version counter, so a buffer is never taken to hold one unchanged."""
    model = torch.nn.Linear(4, 4)
    compiled = compile_backend.compile_model(model, cuda_graphs=True)
    with torch.inference_mode():
        inputs = torch.ones(2, 4)
        first = compiled(inputs)
        inputs.mul_(3)  # in place, unseen by a version counter
        torch.testing.assert_close(compiled(inputs), model(inputs))
    torch.testing.assert_close(first, model(torch.ones(2, 4)))


def check_dropout_draws_a_fresh_mask_each_step(device: str, autocast: bool = False, cuda_graphs: bool = False):
    """Through an identity layer, dropout's output shows its mask: about half the elements kept at p=0.5, a new mask
    each call and for each row, and the gradient masked by the same mask as the forward."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256, bias=False, device=device)
    torch.nn.init.eye_(layer.weight)
    model = torch.nn.Sequential(layer, torch.nn.Dropout(0.5))
    compiled = compile_backend.compile_model(model, cuda_graphs=cuda_graphs)
    inputs = torch.ones(64, 256, device=device)
    runs = compile_backend.stats.session_runs
    masks = []
    for _ in range(3):
        layer.weight.grad = None
        with torch.autocast(device, torch.float16, enabled=autocast):
            output = compiled(inputs)
        output.float().sum().backward()
        mask = output != 0
        masks.append(mask)
        assert 0.45 < mask.float().mean().item() < 0.55
        torch.testing.assert_close(output.float(), mask.float() * 2)  # kept elements scaled by 1 / (1 - p)
        # d(sum)/dW = (2 * mask)^T @ inputs: each row of the gradient counts the batch rows that kept that output.
        torch.testing.assert_close(layer.weight.grad, (2 * mask.float()).sum(0)[:, None].expand(256, 256))
    assert compile_backend.stats.session_runs - runs == 6  # forward and backward, each step, in ONNX Runtime
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[0][0], masks[0][1])  # rows of one batch get masks of their own
    agreement = (masks[0] == masks[1]).float().mean().item()
    assert 0.45 < agreement < 0.55  # independent masks agree on about half the elements


def test_dropout_draws_a_fresh_mask_each_step():
    check_dropout_draws_a_fresh_mask_each_step("cpu")


def with_dropout(model: torch.nn.Module, p: float) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model


def check_dropout_masks_are_pytorchs(graph_cache, cuda_graphs: bool):
    """PyTorch draws dropout's masks and ONNX Runtime applies them: on the CPU, from the same seed, the very masks
    of eager PyTorch, so the same losses and gradients, step after step. No graph draws random numbers itself."""
    data = tiny_dataset("bert")
    batch = {key: torch.stack([row[key] for row in data[:8]]) for key in data[0]}
    eager, model = with_dropout(tiny_model("bert"), 0.2), with_dropout(tiny_model("bert"), 0.2)
    for module in (eager, model):
        transformers_compat.settle_problem_type(module, batch["labels"])  # one pair of graphs
    compiled = compile_backend.compile_model(model, cuda_graphs=cuda_graphs)
    runs = compile_backend.stats.session_runs
    losses = []
    for step in range(3):
        for module, run in ((eager, eager), (model, compiled)):
            module.zero_grad()
            torch.manual_seed(step)
            loss = run(**batch).loss
            loss.backward()
            losses.append(loss.item())
        for (name, expected), actual in zip(eager.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(actual.grad, expected.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert compile_backend.stats.session_runs - runs == 6
    assert losses[1::2] == pytest.approx(losses[0::2], abs=1e-6)
    assert len(set(losses[0::2])) == 3  # a new mask each step (the batch and weights stay the same)
    random_nodes = {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli"}
    graphs = [onnx.load(path) for path in graph_cache.glob("*.onnx")]
    assert len(graphs) == 2 and not any(node.op_type in random_nodes for graph in graphs for node in graph.graph.node)


def test_dropout_masks_are_pytorchs(graph_cache):
    check_dropout_masks_are_pytorchs(graph_cache, cuda_graphs=False)


def test_dropout_masks_are_pytorchs_in_buffers_bound_once(graph_cache, bound_once_on_cpu):
    """Where CUDA graphs replay, the masks are copied into the buffers bound once: a new mask at each replay."""
    check_dropout_masks_are_pytorchs(graph_cache, cuda_graphs=True)
    assert len(bound_once_on_cpu) == 2


def test_cuda_graphs_refuse_a_graph_that_draws_random_numbers_in_onnx_runtime():
    class Noise(torch.nn.Module):
        def forward(self, inputs):
            return inputs + torch.rand_like(inputs)

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Noise())
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as raised:
        compile_backend.compile_model(model, cuda_graphs=True)(torch.ones(2, 8))
    assert compile_backend.describe_failure(model, raised.value) == (
        "ONNX Runtime (compile backend) could not train Sequential: A CUDA graph replays the random numbers it "
        "captured, and this graph draws some in ONNX Runtime (aten.rand_like.default): each step would draw the same "
        "ones. To fix: compile without CUDA graphs."
    )


def test_dropout_in_the_trainer_matches_transformers_trainer(tmp_path):
    """With dropout on, the compile backend trains as `transformers.Trainer` does on the CPU: the Trainer's seed
    fixes the masks, which PyTorch draws for both, on the same shapes (no padding added to a bucket of lengths).
    Another seed, other masks."""

    def train(trainer_class, seed):
        output_dir = tmp_path / f"{trainer_class.__name__}{seed}"
        args = compile_args(output_dir, seed=seed, max_steps=3, logging_steps=1, trim_padding=False)
        model = with_dropout(tiny_model("bert"), 0.2)
        trainer = trainer_class(model=model, args=args, train_dataset=tiny_dataset("bert"))
        runs = compile_backend.stats.session_runs
        trainer.train()
        assert compile_backend.stats.session_runs - runs == (6 if trainer_class is ORTTrainer else 0)
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer.model

    losses, model = train(ORTTrainer, seed=1)
    reference_losses, reference_model = train(Trainer, seed=1)
    assert losses == pytest.approx(reference_losses, abs=1e-5)
    for (name, value), expected in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=0, msg=name)
    assert train(ORTTrainer, seed=2)[0] != pytest.approx(losses, abs=1e-5)
