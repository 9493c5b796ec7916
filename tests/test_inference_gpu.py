"""`--inference_with_ort` on CUDA: fp32 and fp16 sessions, I/O binding. Runs where a GPU and onnxruntime-gpu are."""

import numpy as np
import pytest
import torch

from ort_trainer import cuda_streams
from ort_trainer.import_utils import onnxruntime_providers
from ort_trainer.inference.classification import Classifier
from ort_trainer.inference.seq2seq import Seq2SeqLM

from .test_inference import padded_rows
from .tiny_models import CONFIGS


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime_providers(),
    reason="needs a CUDA GPU and an ONNX Runtime build with CUDAExecutionProvider (onnxruntime-gpu)",
)


def model_and_batch(head):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(0)
    config = CONFIGS["bert"]()
    config.num_labels = 3
    model_class = AutoModelForTokenClassification if head == "token" else AutoModelForSequenceClassification
    model = model_class.from_config(config).cuda().eval()
    rows = padded_rows(64, seed=3)
    batch = {key: torch.stack([row[key] for row in rows]).cuda() for key in ("input_ids", "attention_mask")}
    return model, batch


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_fp32_cuda_session_equals_pytorch(head, tmp_path):
    model, batch = model_and_batch(head)
    onnx_model = Classifier.load(model, batch, tmp_path).session
    assert onnx_model.provider == "CUDAExecutionProvider" and onnx_model.optimization.endswith("fp32")
    logits = onnx_model(batch)["logits"]
    assert logits.is_cuda  # I/O binding: the outputs never left the GPU
    with torch.no_grad():
        expected = model(**batch).logits
    keep = batch["attention_mask"].bool() if head == "token" else slice(None)
    assert torch.equal(logits.argmax(-1)[keep], expected.argmax(-1)[keep])
    np.testing.assert_allclose(logits[keep].cpu().numpy(), expected[keep].cpu().numpy(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_fp16_cuda_session_agrees_with_pytorch_fp16(head, tmp_path):
    model, batch = model_and_batch(head)
    onnx_model = Classifier.load(model, batch, tmp_path, fp16=True).session
    assert onnx_model.optimization.endswith("fp16") and onnx_model.path.name.endswith("_fp16.onnx")
    logits = onnx_model(batch)["logits"]
    assert logits.dtype == torch.float32  # inputs and outputs keep their types
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        expected = model(**batch).logits.float()
    keep = batch["attention_mask"].bool() if head == "token" else slice(None)
    agreement = (logits.argmax(-1)[keep] == expected.argmax(-1)[keep]).float().mean().item()
    assert agreement >= 0.999


def test_session_runs_in_order_with_pytorch_without_waiting_for_the_gpu(tmp_path):
    """A run starts after the PyTorch work queued before it (writing its inputs, behind a GPU sleep), PyTorch's
    later work comes after the run (reusing the inputs' memory, reading the outputs, while the session's stream
    sleeps longer), and the run returns before the GPU gets there, as a PyTorch forward would."""
    model, batch = model_and_batch("sequence")
    session = Classifier.load(model, batch, tmp_path).session
    expected = session(batch)["logits"]
    inputs = {name: torch.zeros_like(value) for name, value in batch.items()}
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    for name, value in batch.items():
        inputs[name].copy_(value)
    with torch.cuda.stream(cuda_streams.ort_stream(expected.device)):
        torch.cuda._sleep(2_000_000_000)
    logits = session(inputs)["logits"]
    returned = torch.cuda.Event()
    returned.record()
    del inputs
    _overwrite = [torch.full_like(value, 1) for value in batch.values()]  # likely in the inputs' freed memory
    read = logits.clone()
    assert not returned.query()  # the GPU is still asleep: the run was queued, not waited for
    torch.testing.assert_close(read, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_cuda_generation_equals_pytorch(name, tmp_path):

    from .test_generation import padded_batch
    from .tiny_models import tiny_model

    model = tiny_model(name).cuda().eval()
    sample = [tensor.cuda() for tensor in padded_batch(model, rows=2, length=7, seed=0)]
    onnx_model = Seq2SeqLM.load(model, dict(zip(("input_ids", "attention_mask"), sample)), tmp_path)
    assert onnx_model.provider == "CUDAExecutionProvider"
    input_ids, attention_mask = (tensor.cuda() for tensor in padded_batch(model, rows=5, length=13, seed=1))
    for num_beams in (1, 4):
        settings = {"min_new_tokens": 12, "max_new_tokens": 17, "num_beams": num_beams}
        with torch.no_grad():
            expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
        with onnx_model.running(model):
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
        assert generated.is_cuda and torch.equal(generated, expected)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_fp16_cuda_generation_agrees_with_pytorch_fp16(name, tmp_path):

    from .test_generation import padded_batch
    from .tiny_models import tiny_model

    model = tiny_model(name).cuda().eval()
    input_ids, attention_mask = (tensor.cuda() for tensor in padded_batch(model, rows=16, length=13, seed=1))
    onnx_model = Seq2SeqLM.load(model, {"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path, fp16=True)
    assert all(session.path.name.endswith("_fp16.onnx") for session in onnx_model.sessions)
    settings = {"min_new_tokens": 12, "max_new_tokens": 12}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    with onnx_model.running(model):
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    agreement = (generated == expected).float().mean().item()
    print(f"{name}: fp16 ORT and PyTorch fp16 autocast agree on {agreement:.1%} of generated tokens")
    assert agreement >= 0.95
