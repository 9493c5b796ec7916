"""`--inference_with_ort` on CUDA: fp32 and fp16 sessions, I/O binding. Runs where a GPU and onnxruntime-gpu are."""

import numpy as np
import pytest
import torch

from ort_trainer.import_utils import onnxruntime_providers
from ort_trainer.onnx import load_onnx_model

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
    onnx_model = load_onnx_model(model, batch, tmp_path)
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
    onnx_model = load_onnx_model(model, batch, tmp_path, fp16=True)
    assert onnx_model.optimization.endswith("fp16") and onnx_model.path.name.endswith("_fp16.onnx")
    logits = onnx_model(batch)["logits"]
    assert logits.dtype == torch.float32  # inputs and outputs keep their types
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        expected = model(**batch).logits.float()
    keep = batch["attention_mask"].bool() if head == "token" else slice(None)
    agreement = (logits.argmax(-1)[keep] == expected.argmax(-1)[keep]).float().mean().item()
    assert agreement >= 0.999
