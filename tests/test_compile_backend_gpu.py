"""The compile backend on CUDA, with and without CUDA graphs. Runs where a GPU and onnxruntime-gpu are."""

import pytest
import torch

from ort_trainer import ORTTrainer, ORTTrainingArguments, compile_backend, cuda_streams, transformers_compat
from ort_trainer.import_utils import onnxruntime_providers

from .test_compile_backend import check_dropout_draws_a_fresh_mask_each_step, with_dropout
from .tiny_models import tiny_dataset, tiny_model


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime_providers(),
    reason="needs a CUDA GPU and an ONNX Runtime build with CUDAExecutionProvider (onnxruntime-gpu)",
)


@pytest.fixture(autouse=True)
def graph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORT_TRAINER_CACHE", str(tmp_path / "cache"))
    torch._dynamo.reset()


def train_losses(tmp_path, name, model_name="bert", dropout=0.0, **overrides):
    args = ORTTrainingArguments(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_steps=6,
        logging_steps=1,
        seed=0,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        ort_fallback="error",
        ort_backend="compile",
        **overrides,
    )
    model = with_dropout(tiny_model(model_name), dropout)
    trainer = ORTTrainer(model=model, args=args, train_dataset=tiny_dataset(model_name, size=48))
    runs = compile_backend.stats.session_runs
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, compile_backend.stats.session_runs - runs, trainer.model


@pytest.fixture
def replayed(monkeypatch):
    """For each run through the CUDA-graph path, whether its graph was captured as a CUDA graph."""
    runs, run_replayed = [], compile_backend.ONNXRuntimeGraph._run_replayed
    monkeypatch.setattr(
        compile_backend.ONNXRuntimeGraph,
        "_run_replayed",
        lambda graph, inputs: runs.append(graph.cuda_graph) or run_replayed(graph, inputs),
    )
    return runs


def assert_trained_alike(losses, model, reference_losses, reference_model):
    assert losses == pytest.approx(reference_losses, abs=1e-4)
    for (name, parameter), expected in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(parameter, expected, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_training_matches_pytorch(tmp_path, replayed, cuda_graphs):
    reference, _, pytorch_model = train_losses(tmp_path, "pytorch", use_ort=False)
    losses, runs, model = train_losses(tmp_path, "ort", ort_cuda_graphs=cuda_graphs)
    assert runs == 12  # a forward and a backward graph each step, in ONNX Runtime
    assert replayed == [True] * (12 if cuda_graphs else 0)  # through the buffers a captured CUDA graph reads
    assert_trained_alike(losses, model, reference, pytorch_model)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fp16_training_follows_pytorch_fp16(tmp_path, cuda_graphs):
    """Under fp16 autocast and the Trainer's GradScaler, with GELU's gradient computed in fp16: fp16's tolerance."""
    reference, _, pytorch_model = train_losses(tmp_path, "pytorch", use_ort=False, fp16=True)
    losses, runs, model = train_losses(tmp_path, "ort", fp16=True, ort_cuda_graphs=cuda_graphs)
    assert runs == 12
    assert losses == pytest.approx(reference, abs=1e-3)
    for (name, parameter), expected in zip(model.named_parameters(), pytorch_model.parameters(), strict=True):
        torch.testing.assert_close(parameter, expected, atol=1e-3, rtol=0, msg=name)


def test_t5_trains_under_cuda_graphs_like_pytorch(tmp_path, replayed):
    """T5's forward graph returns a constant (its relative position buckets), which ONNX Runtime would copy into
    the bound output with a copy that waits for the device: a CUDA graph cannot capture that."""
    reference, _, pytorch_model = train_losses(tmp_path, "pytorch", "t5", use_ort=False)
    losses, runs, model = train_losses(tmp_path, "ort", "t5", ort_cuda_graphs=True)
    assert runs >= 12 and replayed == [True] * runs
    assert_trained_alike(losses, model, reference, pytorch_model)


def gpu_reached_here() -> bool:
    """Whether the GPU has finished all the work queued so far on the current stream."""
    event = torch.cuda.Event()
    event.record()
    return event.query()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compiled_step_runs_in_order_with_pytorch(cuda_graphs):
    """Forward and backward in ONNX Runtime start after the PyTorch work queued before them (writing the batch,
    behind a GPU sleep), and PyTorch's later work comes after them (reading the loss and gradients while the
    sessions' stream sleeps longer). The forward returns before the GPU gets there, as PyTorch's would; so does the
    backward with CUDA graphs (without, its run waits for the GPU once: docs/gpu.md)."""
    model = tiny_model("bert").cuda()
    compiled = compile_backend.compile_model(model, cuda_graphs=cuda_graphs)
    rows = tiny_dataset("bert", size=8)
    batch = {name: torch.stack([row[name] for row in rows]).cuda() for name in rows[0]}
    transformers_compat.settle_problem_type(model, batch["labels"])  # as the trainer does: one pair of graphs

    def forward(inputs):
        model.zero_grad()
        return compiled(**inputs).loss

    def backward(loss):
        loss.backward()
        return [parameter.grad for parameter in model.parameters()]

    for _ in range(3):  # ONNX Runtime captures a graph on its second run and only replays it from the third
        expected_loss = forward(batch)
        expected_gradients = backward(expected_loss)
    inputs = {name: torch.zeros_like(value) for name, value in batch.items()}
    torch.cuda.synchronize()
    graphs, runs = compile_backend.stats.graphs_built, compile_backend.stats.session_runs
    torch.cuda._sleep(1_000_000_000)
    for name, value in batch.items():
        inputs[name].copy_(value)
    with torch.cuda.stream(cuda_streams.ort_stream(batch["input_ids"].device)):
        torch.cuda._sleep(2_000_000_000)
    loss = forward(inputs)
    assert not gpu_reached_here()  # the GPU is still asleep: the forward was queued, not waited for
    gradients = backward(loss)
    if cuda_graphs:
        assert not gpu_reached_here()  # and so was the backward
    read = [loss.clone()] + [gradient.clone() for gradient in gradients]
    assert (compile_backend.stats.graphs_built, compile_backend.stats.session_runs) == (graphs, runs + 2)
    for value, expected in zip(read, [expected_loss.detach()] + expected_gradients, strict=True):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_dropout_draws_a_fresh_mask_each_step(autocast, cuda_graphs):
    check_dropout_draws_a_fresh_mask_each_step("cuda", autocast, cuda_graphs)


def test_dropout_trains_under_cuda_graphs_as_without_them(tmp_path, replayed):
    """PyTorch draws dropout's masks on the device from the Trainer's seed, replayed graph or not: the same masks,
    so the same losses and weights."""
    reference, _, reference_model = train_losses(tmp_path, "plain", dropout=0.1)
    losses, runs, model = train_losses(tmp_path, "replayed", dropout=0.1, ort_cuda_graphs=True)
    assert runs == 12 and replayed == [True] * 12
    assert_trained_alike(losses, model, reference, reference_model)
    no_dropout, _, _ = train_losses(tmp_path, "no_dropout")
    assert losses != pytest.approx(no_dropout, abs=1e-4)  # dropout was on
