"""Sequence and token classifiers in ONNX Runtime: one graph from the inputs to the logits, with ORT's transformer
fusions where they keep the outputs."""

import inspect
import logging
from pathlib import Path

import torch

from .. import transformers_compat
from . import fusion
from .export import evaluating, export_key, export_module, reuse_or_export
from .model import InferenceModel
from .quantization import RECIPE, on_cpu_only, quantize_dynamic_int8
from .session import ONNXModel, convert_to_fp16, session_target


logger = logging.getLogger(__name__)

# The heads, their outputs and the names of the outputs' dynamic axes.
HEAD_OUTPUTS = {
    "ForSequenceClassification": {"logits": {0: "batch"}},
    "ForTokenClassification": {"logits": {0: "batch", 1: "sequence"}},
}
OUTPUT_CLASSES = {
    "ForSequenceClassification": transformers_compat.SequenceClassifierOutput,
    "ForTokenClassification": transformers_compat.TokenClassifierOutput,
}


def classifier_head(model: torch.nn.Module) -> str | None:
    """The head of a classifier class or its parents (e.g. "ForSequenceClassification"), or None."""
    for cls in type(model).__mro__:
        for head in HEAD_OUTPUTS:
            if cls.__name__.endswith(head):
                return head
    return None


def export_classifier(model: torch.nn.Module, sample_inputs: dict, path: Path) -> Path:
    """Export the graph from the inputs to the logits, with dynamic batch and sequence axes."""
    outputs = HEAD_OUTPUTS[classifier_head(model)]
    # The exporter names graph inputs in the order of `forward`'s parameters, whatever the dict's order.
    parameters = list(inspect.signature(model.forward).parameters)
    input_names = sorted(sample_inputs, key=parameters.index)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names} | outputs
    with evaluating(model):
        export_module(model, sample_inputs, input_names, list(outputs), dynamic_axes, path)
    return path


def _export_and_choose_graph(model, sample_inputs, directory: Path, provider: str, device, optimize: bool) -> str:
    """Export, then keep the fused graph only if it gives the exported graph's outputs."""
    path, fused_path = directory / "model.onnx", directory / "model_optimized.onnx"
    for stale in directory.glob("model_*.onnx"):
        stale.unlink()
    export_classifier(model, sample_inputs, path)
    if not (optimize and fusion.can_fuse(model)):
        return path.name
    fusable = directory / "model_fusable.onnx"
    with fusion.fusable_attention(model):
        export_classifier(model, sample_inputs, fusable)
    fusion.fuse(fusable, model.config, provider, fused_path)
    plain, fused = (ONNXModel.open(graph, provider, device) for graph in (path, fused_path))
    if fusion.same_outputs(plain, fused, sample_inputs):
        return fused_path.name
    logger.warning("ORT's transformer optimizer changed this model's outputs; evaluating the unfused graph.")
    return path.name


class Classifier(InferenceModel):
    """A sequence or token classifier's graph in a session. Its forward computes the logits there and, given labels,
    the loss the model's own forward computes from them. A quantized classifier keeps its fp32 counterpart as
    `reference`."""

    can_quantize = True

    def __init__(self, session: ONNXModel, head: str, reference: "Classifier | None" = None):
        self.session, self.head, self.reference = session, head, reference
        self.sessions = (session,)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return classifier_head(model) is not None

    @classmethod
    def load(
        cls,
        model,
        sample_inputs: dict,
        directory: Path,
        fp16: bool = False,
        quantize: bool = False,
        optimize: bool = True,
    ) -> "Classifier":
        """Exported into `directory` (reused while the weights and config are unchanged), fused when the fused graph
        gives the same outputs on `sample_inputs`, in fp16 when `fp16` and running on CUDA (inputs and outputs keep
        their types), or in dynamic int8 when `quantize` and running on the CPU."""
        device, provider, fp16 = session_target(model, fp16)
        quantize = on_cpu_only(quantize, provider, "classifier", "fp16" if fp16 else "fp32")
        directory = Path(directory)
        key = export_key(
            model,
            inputs=sorted(sample_inputs),
            provider=provider,
            optimize=optimize,
            fp16=fp16,
            quantize=quantize and RECIPE,
        )

        def export() -> list:
            graph = _export_and_choose_graph(model, sample_inputs, directory, provider, device, optimize)
            if fp16:
                return [convert_to_fp16(directory / graph)]
            return [graph, quantize_dynamic_int8(directory / graph)] if quantize else [graph]

        graph, *quantized = reuse_or_export(directory, key, export)
        optimization = "transformer fusions" if "optimized" in graph else "none"
        head = classifier_head(model)
        fp32 = cls(
            ONNXModel.open(directory / graph, provider, device, f"{optimization}, {'fp16' if fp16 else 'fp32'}"),
            head,
        )
        if not quantized:
            return fp32
        int8 = ONNXModel.open(directory / quantized[0], provider, device, f"{optimization}, {RECIPE}")
        return cls(int8, head, reference=fp32)

    def forward(self, model, labels=None, **inputs):
        logits = self.session(inputs)["logits"]
        loss = None if labels is None else transformers_compat.head_loss(self.head, logits, labels, model.config)
        return OUTPUT_CLASSES[self.head](loss=loss, logits=logits)
