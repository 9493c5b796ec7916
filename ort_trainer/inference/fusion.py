"""ONNX Runtime's transformer optimizer on exported classifiers: attention, layer norm and GELU fused into single
kernels, kept only where the fused graph gives the exported graph's outputs."""

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .. import transformers_compat
from .session import ONNXModel


logger = logging.getLogger(__name__)

# Model types whose graphs ORT's transformer optimizer fuses, and the fusion recipe it uses for them.
OPTIMIZER_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
    "electra": "bert",
}
FUSABLE_ATTENTION = "ort_fusable"
# How far fused kernels may move fp32 logits: CUDA's reorder sums more than the CPU's.
FUSION_TOLERANCE = {"CPUExecutionProvider": 1e-4, "CUDAExecutionProvider": 1e-3}


def can_fuse(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in OPTIMIZER_MODEL_TYPES


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


@contextlib.contextmanager
def fusable_attention(model: torch.nn.Module):
    """Inside, the model's attention is written the way ORT's transformer optimizer recognises, for an export."""
    transformers_compat.register_attention(FUSABLE_ATTENTION, _fusable_attention, _fusable_padding_mask)
    with transformers_compat.attention(model, FUSABLE_ATTENTION):
        yield


def fuse(fusable: Path, config, provider: str, fused: Path) -> None:
    """Write `fused` with ORT's fusions applied to `fusable`, a graph exported with `fusable_attention`, which is
    then deleted."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", 0)
    _name_head_count(fusable, heads, hidden // heads)
    optimized = optimize_model(
        str(fusable),
        model_type=OPTIMIZER_MODEL_TYPES[config.model_type],
        num_heads=heads,
        hidden_size=hidden,
        use_gpu=provider == "CUDAExecutionProvider",
        opt_level=0,
    )
    optimized.save_model_to_file(str(fused))
    fusable.unlink()


def same_outputs(first: ONNXModel, second: ONNXModel, inputs: dict) -> bool:
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
