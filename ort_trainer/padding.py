"""Dropping the columns that are padding in every row of a batch."""

import torch


SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def trim_padding(inputs: dict, labels_too: bool = False) -> dict:
    """Drop the trailing columns that are padding in every row of the batch. Padded positions are masked out of
    attention and their labels ignored, so results stay equal while the work shrinks to the longest real sequence
    (ONNX Runtime's own padding elimination exists only in its CUDA build). Left padding is kept, since absolute
    positions would move. `labels_too` trims per-token labels as well."""
    mask = inputs.get("attention_mask")
    if not torch.is_tensor(mask) or mask.dim() != 2 or not mask.any():
        return inputs
    width = mask.shape[1]
    length = int(mask.any(0).nonzero().max()) + 1
    if length == width:
        return inputs
    names = SEQUENCE_INPUTS + (("labels",) if labels_too else ())
    # Contiguous, as the untrimmed batch was: the loss code views per-token labels (`labels.view(-1)`).
    return {
        name: value[:, :length].contiguous()
        if name in names and torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == width
        else value
        for name, value in inputs.items()
    }
