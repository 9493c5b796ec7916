"""`--inference_with_ort`: a model's heads exported to ONNX and run in ONNX Runtime sessions.

`load_for_inference` returns an `InferenceModel`; inside its `running(model)`, the model's forward (and for generative
models its generation steps) computes in the sessions. Each head is one module here and one line in `HEADS`.
"""

from pathlib import Path

import torch

from .causal_lm import CausalLM
from .classification import Classifier
from .export import ONNXExportError
from .model import InferenceModel
from .quantization import agreement
from .seq2seq import Seq2SeqLM
from .session import select_provider, warn_once


# Tried in order: the first whose `supports(model)` is true loads the model's sessions.
HEADS = (Seq2SeqLM, CausalLM, Classifier)

__all__ = [
    "HEADS",
    "InferenceModel",
    "ONNXExportError",
    "agreement",
    "load_for_inference",
    "select_provider",
    "supports",
]


def supports(model: torch.nn.Module) -> bool:
    """Whether some head here can run `model`."""
    return any(head.supports(model) for head in HEADS)


def load_for_inference(
    model: torch.nn.Module, sample_inputs: dict, directory: Path, fp16: bool = False, quantize: bool = False
) -> InferenceModel:
    """`model`'s sessions, exported from `sample_inputs` into `directory` (or reused from there while the weights and
    config are unchanged). `fp16` applies on CUDA, `quantize` (dynamic int8) on the CPU, to heads that can have it."""
    head = next((head for head in HEADS if head.supports(model)), None)
    if head is None:
        raise ONNXExportError(
            f"`--inference_with_ort` runs sequence and token classifiers, encoder-decoder and decoder-only language "
            f"models; {type(model).__name__} is none of these. To fix: evaluate it in PyTorch (drop "
            "`--inference_with_ort`)."
        )
    if quantize and not head.can_quantize:
        warn_once(
            f"`--ort_quantization dynamic_int8` applies to sequence and token classifiers and sequence-to-sequence "
            f"models; {type(model).__name__} evaluates with its fp32 graphs."
        )
    settings = {"quantize": quantize} if head.can_quantize else {}
    return head.load(model, sample_inputs, Path(directory), fp16=fp16, **settings)
