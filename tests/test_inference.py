"""`--inference_with_ort`: evaluation and prediction in an InferenceSession give the PyTorch model's results."""

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForTokenClassification

from ort_trainer import ORTTrainer, ORTTrainingArguments
from ort_trainer.inference import ONNXExportError
from ort_trainer.inference.classification import Classifier
from ort_trainer.inference.fusion import same_outputs
from ort_trainer.inference.session import select_provider, warn_once

from .conftest import CPU_RUN
from .tiny_models import CONFIGS, VOCAB, tiny_model


LENGTH = 16


def padded_rows(size, token_labels=False, seed=1):
    """Rows of 3 to 16 real tokens padded to 16 (pad id 0); labels from the first token, or per token."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        real = int(torch.randint(3, LENGTH + 1, (1,), generator=generator))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:real] = torch.randint(3, VOCAB, (real,), generator=generator)
        mask = (ids != 0).long()
        if token_labels:
            labels = torch.where(mask.bool(), ids % 3, torch.full_like(ids, -100))
        else:
            labels = torch.tensor(int(ids[0]) % 2)
        # token_type_ids first: the graph's inputs must follow `forward`'s order, not the batch's.
        rows.append(
            {"token_type_ids": torch.zeros_like(ids), "input_ids": ids, "attention_mask": mask, "labels": labels}
        )
    return rows


def accuracy(prediction):
    predictions, labels = prediction.predictions.argmax(-1), prediction.label_ids
    keep = labels != -100
    return {"accuracy": float((predictions[keep] == labels[keep]).mean())}


def run(model, tmp_path, data, inference_with_ort):
    args = ORTTrainingArguments(
        **CPU_RUN, output_dir=str(tmp_path), max_steps=10, ort_fallback="error", inference_with_ort=inference_with_ort
    )
    trainer = ORTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:21], compute_metrics=accuracy)
    return trainer


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_classification_metrics_and_logits_match_pytorch(name, tmp_path, caplog):
    data = padded_rows(64)
    trainer = run(tiny_model(name), tmp_path, data, inference_with_ort=False)
    trainer.train()
    pytorch_metrics = trainer.evaluate()
    pytorch_prediction = trainer.predict(data[:21])

    trainer.args.inference_with_ort = True
    with caplog.at_level("INFO", logger="ort_trainer"):
        ort_metrics = trainer.evaluate()
    assert "Evaluation backend: ONNX Runtime on CPUExecutionProvider" in caplog.text
    ort_prediction = trainer.predict(data[:21])  # 21 rows: the last batch is partial

    assert ort_metrics["eval_accuracy"] == pytorch_metrics["eval_accuracy"]
    assert ort_metrics["eval_loss"] == pytest.approx(pytorch_metrics["eval_loss"], abs=1e-5)
    np.testing.assert_array_equal(ort_prediction.predictions.argmax(-1), pytorch_prediction.predictions.argmax(-1))
    np.testing.assert_allclose(ort_prediction.predictions, pytorch_prediction.predictions, atol=1e-4, rtol=0)
    # Exported after ORT training, yet a standard graph: ORT's ATen export rules stayed inside its own exports.
    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    assert {node.domain for node in graph.node} == {""}
    assert "ATen" not in {node.op_type for node in graph.node}


def test_token_classification_matches_pytorch_on_every_token(tmp_path):
    torch.manual_seed(0)
    config = CONFIGS["bert"]()
    config.num_labels = 3
    model = AutoModelForTokenClassification.from_config(config)
    data = padded_rows(48, token_labels=True)
    trainer = run(model, tmp_path, data, inference_with_ort=False)
    trainer.train()
    pytorch_prediction = trainer.predict(data[:21])
    trainer.args.inference_with_ort = True
    ort_prediction = trainer.predict(data[:21])
    keep = pytorch_prediction.label_ids != -100
    np.testing.assert_array_equal(
        ort_prediction.predictions.argmax(-1)[keep], pytorch_prediction.predictions.argmax(-1)[keep]
    )
    np.testing.assert_allclose(
        ort_prediction.predictions[keep], pytorch_prediction.predictions[keep], atol=1e-4, rtol=0
    )
    assert ort_prediction.metrics["test_accuracy"] == pytorch_prediction.metrics["test_accuracy"]


def test_export_is_reused_while_weights_are_unchanged(tmp_path):
    data = padded_rows(16)
    trainer = run(tiny_model("bert"), tmp_path, data, inference_with_ort=True)
    trainer.evaluate()
    exported = tmp_path / "onnx" / "model.onnx"
    first = exported.stat().st_mtime_ns
    trainer.evaluate()
    assert exported.stat().st_mtime_ns == first
    with torch.no_grad():
        trainer.model.classifier.bias.add_(1.0)
    trainer.evaluate()
    assert exported.stat().st_mtime_ns != first


class BesselHead(type(tiny_model("bert"))):
    """A classifier whose head uses an operator the ONNX exporter does not know."""

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        output.logits = torch.special.bessel_j0(output.logits)
        return output


def test_model_that_cannot_be_exported_names_the_operator(tmp_path):
    torch.manual_seed(0)
    config = CONFIGS["bert"]()
    config.num_labels = 2
    trainer = run(BesselHead(config), tmp_path, padded_rows(8), inference_with_ort=True)
    with pytest.raises(ONNXExportError, match="aten::special_bessel_j0") as raised:
        trainer.evaluate()
    assert "\n" not in str(raised.value)


def test_provider_follows_the_model_device_and_the_installed_build(caplog):
    warn_once.cache_clear()
    both, cpu_only = ("CUDAExecutionProvider", "CPUExecutionProvider"), ("CPUExecutionProvider",)
    assert select_provider(torch.device("cuda", 1), both) == "CUDAExecutionProvider"
    assert select_provider(torch.device("cpu"), both) == "CPUExecutionProvider"
    assert select_provider(torch.device("cpu"), cpu_only, without_cuda="pytorch") == "CPUExecutionProvider"
    with caplog.at_level("WARNING"):
        assert select_provider(torch.device("cuda", 0), cpu_only) == "CPUExecutionProvider"
        assert select_provider(torch.device("cuda", 0), cpu_only) == "CPUExecutionProvider"
        assert select_provider(torch.device("cuda", 0), cpu_only, without_cuda="pytorch") is None
    assert caplog.messages == [
        "The model is on cuda:0, but the installed ONNX Runtime has no CUDAExecutionProvider: evaluating with ONNX "
        "Runtime on the CPU. To evaluate on the GPU: pip install onnxruntime-gpu; to evaluate in PyTorch instead: "
        "`--ort_inference_without_cuda pytorch`.",
        "The model is on cuda:0, but the installed ONNX Runtime has no CUDAExecutionProvider: evaluating in PyTorch "
        "(`--ort_inference_without_cuda pytorch`). To evaluate with ONNX Runtime on the GPU: pip install "
        "onnxruntime-gpu.",
    ]


def test_cpu_sessions_stay_fp32_even_when_fp16_is_asked(tmp_path):
    model = tiny_model("bert").eval()
    sample = {key: torch.stack([row[key] for row in padded_rows(4)]) for key in ("input_ids", "attention_mask")}
    onnx_model = Classifier.load(model, sample, tmp_path, fp16=True).session
    assert onnx_model.provider == "CPUExecutionProvider" and onnx_model.optimization.endswith("fp32")
    assert not list(tmp_path.glob("*fp16*"))
    with torch.no_grad():
        np.testing.assert_allclose(onnx_model(sample)["logits"].numpy(), model(**sample).logits.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert"])
def test_transformer_fusions_apply_to_transformers_graphs(name, tmp_path):
    """ORT's optimizer fuses attention, embedding and layer norms into single nodes, with PyTorch's outputs."""
    model = tiny_model(name).eval()
    rows = padded_rows(8)
    sample = {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "attention_mask")}
    onnx_model = Classifier.load(model, sample, tmp_path).session
    assert onnx_model.optimization == "transformer fusions, fp32"
    operators = [node.op_type for node in onnx.load(onnx_model.path).graph.node]
    layers = model.config.n_layers if name == "distilbert" else model.config.num_hidden_layers
    assert operators.count("Attention") == layers
    assert "SkipLayerNormalization" in operators
    assert model.config._attn_implementation == tiny_model(name).config._attn_implementation  # restored after export
    with torch.no_grad():
        np.testing.assert_allclose(onnx_model(sample)["logits"].numpy(), model(**sample).logits.numpy(), atol=1e-5)


def test_fused_graph_check_tolerates_swaps_only_between_near_ties():
    def session(logits):
        return _Fixed(torch.tensor(logits))

    near_tie = session([[0.50000, 0.50002], [2.0, -1.0]])
    swapped = session([[0.50002, 0.50000], [2.0, -1.0]])
    assert same_outputs(near_tie, swapped, {})  # a 2e-5 swap between near-equal logits is within tolerance
    assert not same_outputs(session([[0.0, 1.0]]), session([[0.0, 1.001]]), {})  # beyond 1e-4
    assert not same_outputs(session([[0.0, 1e-3]]), session([[1e-3, 0.0]]), {})  # a clear decision changed


class _Fixed:
    provider = "CPUExecutionProvider"

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, inputs):
        return {"logits": self.logits}
