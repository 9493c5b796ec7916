"""Dynamic int8 quantization of CPU graphs with ONNX Runtime's own quantizer: int8 weights, activations quantized
per batch. It changes predictions a little, so evaluation can measure how much against the fp32 graph."""

from pathlib import Path

import numpy as np

from .session import warn_once


# What `quantize_dynamic_int8` does, for the log and for the export cache's key.
RECIPE = "dynamic int8, per-channel weights"


def quantize_dynamic_int8(path: Path) -> str:
    """Write the int8 version of the graph at `path` beside it; returns its file name."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name(path.stem + "_int8.onnx")
    # ONNX's shape inference does not know ORT's fused operators: their outputs are float, as the graph's.
    extra_options = {"DefaultTensorType": TensorProto.FLOAT}
    # A scale for each output channel of each weight: closer to fp32 than one scale a tensor, at the same speed.
    quantize_dynamic(
        str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True, extra_options=extra_options
    )
    return quantized.name


def on_cpu_only(quantize: bool, provider: str, what: str, precision: str) -> bool:
    """Whether to quantize: asked for and on the CPU. On another provider it says once what runs instead."""
    if quantize and provider != "CPUExecutionProvider":
        warn_once(
            f"`--ort_quantization dynamic_int8` applies to CPU sessions only; on {provider} the {what} evaluates in "
            f"{precision}."
        )
        return False
    return quantize


def agreement(predictions: np.ndarray, reference: np.ndarray, labels: np.ndarray, pad_token_id: int = 0) -> float:
    """The share of predictions equal to the reference's: for logits, of their argmax where there is a label; for
    generated token ids, of whole sequences, where -100 and `pad_token_id` both count as padding."""
    if np.issubdtype(predictions.dtype, np.integer):
        width = max(predictions.shape[1], reference.shape[1])
        padded = [
            np.pad(
                np.where(ids == -100, pad_token_id, ids),
                ((0, 0), (0, width - ids.shape[1])),
                constant_values=pad_token_id,
            )
            for ids in (predictions, reference)
        ]
        return float((padded[0] == padded[1]).all(axis=1).mean())
    keep = np.broadcast_to(labels != -100, predictions.shape[:-1]) if labels is not None else ...
    return float((predictions.argmax(-1)[keep] == reference.argmax(-1)[keep]).mean())
