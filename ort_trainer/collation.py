"""What the trainer does to each batch as the data collator makes it: refuse data the model cannot take, and drop the
columns that are padding in every row. Done there, on the host (in the data loader's workers, where there are any),
these reads of the batch cost the GPU nothing; done on a batch already on the GPU, each makes the host wait for
every kernel queued before it."""

import dataclasses
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from .padding import trim_padding


class TrainingDataError(ValueError):
    """A training batch that no backend can train on: the data, not ONNX Runtime, needs fixing."""

    def __init__(self, message: str):
        # Raised in a data loader's worker, it reaches the training loop as "Caught TrainingDataError in DataLoader
        # worker process 0." and the worker's traceback, whose last line is the message.
        if message.startswith("Caught TrainingDataError"):
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


_CLASSIFIER_HEADS = ("ForSequenceClassification", "ForTokenClassification")


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    """The token ids and class labels a model can take: `num_labels` is None where labels are not classes."""

    vocabulary: int
    num_labels: int | None


def batch_limits(model: torch.nn.Module) -> BatchLimits | None:
    """What `check_batch` holds a transformers model's batches to; None for other modules, whose inputs it cannot
    know."""
    if not isinstance(model, PreTrainedModel):
        return None
    num_labels = model.config.num_labels
    classifier = type(model).__name__.endswith(_CLASSIFIER_HEADS) and num_labels > 1
    return BatchLimits(model.get_input_embeddings().num_embeddings, num_labels if classifier else None)


def check_batch(batch: dict, limits: BatchLimits) -> None:
    """Refuse token ids beyond the vocabulary and class labels out of range before ORT runs the batch: its kernels
    report them as ORT failures, or not at all."""
    ids, vocabulary = batch.get("input_ids"), limits.vocabulary
    if torch.is_tensor(ids) and ids.numel() and not (0 <= ids.min() and ids.max() < vocabulary):
        bad = int(ids[(ids < 0) | (ids >= vocabulary)][0])
        raise TrainingDataError(
            f"A training batch has token id {bad}, outside the model's vocabulary of {vocabulary} ids. To fix: "
            "tokenize with the model's tokenizer, or resize its embeddings (`model.resize_token_embeddings`)."
        )
    labels, num_labels = batch.get("labels"), limits.num_labels
    if num_labels is None or not torch.is_tensor(labels) or labels.is_floating_point():
        return  # float labels are multi-label targets; single-label float targets fail in PyTorch, reported then
    known = ((labels >= 0) & (labels < num_labels)) | (labels == -100)
    if not known.all():
        raise TrainingDataError(
            f"A training batch has label {int(labels[~known][0])}, but the model has {num_labels} classes "
            f"(labels 0 to {num_labels - 1}). To fix: map the labels to 0 to {num_labels - 1}, or give the model "
            "as many labels as the data has (`num_labels`)."
        )


@dataclasses.dataclass
class CheckingCollator:
    """The data collator, then `check_batch` (where `limits` is given) and `trim_padding` (where `trim` is) on the
    batch it made. Holds no model, so that it pickles cheaply into the data loader's workers."""

    collate: Callable
    limits: BatchLimits | None = None
    trim: bool = False
    trim_labels: bool = False

    def __call__(self, features):
        batch = self.collate(features)
        if self.limits is not None:
            check_batch(batch, self.limits)
        return trim_padding(batch, labels_too=self.trim_labels) if self.trim else batch
