"""Hugging Face fine-tuning with ONNX Runtime: `ORTTrainer` and `Seq2SeqORTTrainer`."""

from .trainer import ORTSeq2SeqTrainer, ORTTrainer, Seq2SeqORTTrainer
from .training_args import ORTSeq2SeqTrainingArguments, ORTTrainingArguments


__version__ = "0.1.0"

__all__ = [
    "ORTTrainer",
    "Seq2SeqORTTrainer",
    "ORTSeq2SeqTrainer",
    "ORTTrainingArguments",
    "ORTSeq2SeqTrainingArguments",
]
