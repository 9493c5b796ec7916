"""ORTTrainer keeps `Trainer`'s contract (log history, argument subclasses, gradient accumulation, checkpoints
either backend resumes) and says what is wrong: bad data as data errors, ORT failures with their root cause."""

from dataclasses import dataclass, field

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ort_trainer import ORTTrainer
from ort_trainer.ortmodule import ORTTrainingError, is_ortmodule, ortmodule_status
from ort_trainer.trainer import TrainingDataError

from .tiny_models import SEQ, VOCAB, tiny_dataset, tiny_model


def trained_in_ort(trainer) -> bool:
    return ortmodule_status(trainer.accelerator.unwrap_model(trainer.model_wrapped)).backend == "onnxruntime"


def assert_same_weights(model, reference, atol):
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], atol=atol, rtol=0, msg=key)


class LoggedKeys(TrainerCallback):
    def __init__(self):
        self.keys = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(sorted(logs))


def test_log_history_and_on_log_are_trainers_own_first_step_time_is_a_train_metric(cpu_args):
    runs = {}
    for name, trainer_class, args in (
        ("plain", Trainer, cpu_args("plain", args_class=TrainingArguments, max_steps=3, logging_steps=1)),
        ("ort", ORTTrainer, cpu_args("ort", max_steps=3, logging_steps=1)),
    ):
        callback = LoggedKeys()
        trainer = trainer_class(
            model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"), callbacks=[callback]
        )
        runs[name] = trainer, trainer.train(), callback
    (plain, plain_output, plain_logged), (ort, ort_output, ort_logged) = runs["plain"], runs["ort"]
    assert trained_in_ort(ort)
    assert [sorted(entry) for entry in ort.state.log_history] == [sorted(entry) for entry in plain.state.log_history]
    assert ort_logged.keys == plain_logged.keys and len(ort_logged.keys) == 4
    assert ort_output.metrics["train_first_step_seconds"] > 0
    assert set(ort_output.metrics) - set(plain_output.metrics) == {
        "train_first_step_seconds",
        "train_real_tokens_per_sample",
        "train_computed_tokens_per_sample",
    }


@dataclass
class ConfigWithOwnFields(TrainingArguments):
    """As TRL's configs and users' are: `TrainingArguments` and fields of its own."""

    max_prompt_length: int = field(default=64, metadata={"help": "A field TrainingArguments does not have."})


def test_training_arguments_subclass_keeps_its_fields_and_trains_in_ort(cpu_args, tmp_path):
    args = cpu_args(args_class=ConfigWithOwnFields, max_steps=2, max_prompt_length=7)
    trainer = ORTTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"))
    assert isinstance(trainer.args, ConfigWithOwnFields) and trainer.args.max_prompt_length == 7
    assert trainer.args.use_ort and trainer.args.ort_fallback == "pytorch" and trainer.args.max_steps == 2
    assert args.max_prompt_length == 7 and not hasattr(args, "use_ort")  # the user's object is left alone
    trainer.train()
    assert trained_in_ort(trainer)
    trainer.save_model()  # writes the arguments with torch.save, as checkpoints do
    saved = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert isinstance(saved, ConfigWithOwnFields) and (saved.max_prompt_length, saved.use_ort) == (7, True)
    assert saved.to_dict() == trainer.args.to_dict()


def without_attention_mask(rows):
    return [{key: value for key, value in row.items() if key != "attention_mask"} for row in rows]


def test_gpt2_batches_without_attention_mask_train_in_ort_like_pytorch(cpu_args):
    data = without_attention_mask(tiny_dataset("gpt2"))
    reference = Trainer(
        model=tiny_model("gpt2"), args=cpu_args("torch", args_class=TrainingArguments, max_steps=3), train_dataset=data
    )
    reference.train()
    ort = ORTTrainer(model=tiny_model("gpt2"), args=cpu_args("ort", max_steps=3), train_dataset=data)
    ort.train()
    assert trained_in_ort(ort)
    assert_same_weights(ort.model, reference.model, atol=1e-5)


def bad_labels(rows):
    return [dict(row, labels=torch.tensor(5)) if index % 4 == 0 else row for index, row in enumerate(rows)]


def float_labels(rows):
    return [dict(row, labels=row["labels"].float()) for row in rows]


def ids_beyond_vocabulary(rows):
    return [dict(row, input_ids=torch.where(torch.arange(SEQ) == 2, VOCAB + 4, row["input_ids"])) for row in rows]


@pytest.mark.parametrize("fallback", ["error", "pytorch"])
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            bad_labels,
            "A training batch has label 5, but the model has 2 classes (labels 0 to 1). To fix: map the "
            "labels to 0 to 1, or give the model as many labels as the data has (`num_labels`).",
        ),
        (
            float_labels,
            "The training batch fails in PyTorch too, so it is not an ONNX Runtime problem: Target size "
            "(torch.Size([8])) must be the same as input size (torch.Size([8, 2])). To fix: correct the training data "
            "(class labels from 0 to `num_labels` - 1, integer labels for a classifier, token ids below the "
            "vocabulary "
            "size).",
        ),
        (
            ids_beyond_vocabulary,
            f"A training batch has token id {VOCAB + 4}, outside the model's vocabulary of "
            f"{VOCAB} ids. To fix: tokenize with the model's tokenizer, or resize its embeddings "
            "(`model.resize_token_embeddings`).",
        ),
    ],
)
def test_bad_training_data_is_a_data_error_not_an_ort_failure(corrupt, message, fallback, cpu_args, caplog):
    args = cpu_args(max_steps=2, ort_fallback=fallback)
    trainer = ORTTrainer(model=tiny_model("bert"), args=args, train_dataset=corrupt(tiny_dataset("bert")))
    with caplog.at_level("WARNING", logger="ort_trainer"), pytest.raises(TrainingDataError) as raised:
        trainer.train()
    assert str(raised.value) == message
    assert "Training continues in PyTorch" not in caplog.text  # no fallback: PyTorch could not train it either


def test_bad_data_found_in_a_data_loader_worker_is_the_same_one_line_error(cpu_args):
    args = cpu_args(max_steps=2, dataloader_num_workers=1)
    trainer = ORTTrainer(
        model=tiny_model("bert"), args=args, train_dataset=ids_beyond_vocabulary(tiny_dataset("bert"))
    )
    with pytest.raises(TrainingDataError) as raised:
        trainer.train()
    assert str(raised.value) == (
        f"A training batch has token id {VOCAB + 4}, outside the model's vocabulary of {VOCAB} ids. To fix: tokenize "
        "with the model's tokenizer, or resize its embeddings (`model.resize_token_embeddings`)."
    )
    assert trainer.state.global_step == 0


class OwnLoaderTrainer(ORTTrainer):
    """Builds its training loader itself, so that its batches reach the training step unchecked."""

    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=8, collate_fn=self.data_collator)


def test_batches_of_a_loader_the_trainer_did_not_build_are_checked_in_the_training_step(cpu_args):
    trainer = OwnLoaderTrainer(
        model=tiny_model("bert"), args=cpu_args(max_steps=2), train_dataset=bad_labels(tiny_dataset("bert"))
    )
    with pytest.raises(TrainingDataError, match="^A training batch has label 5, but the model has 2 classes"):
        trainer.train()


class DiffClassifier(torch.nn.Module):
    """Uses `torch.diff`, which the TorchScript exporter cannot export (as transformers' mask code for GPT-2)."""

    def __init__(self):
        super().__init__()
        self.embedding, self.head = torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.diff(self.embedding(input_ids), dim=1).mean(1))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_ort_failure_names_its_root_cause(cpu_args, caplog):
    expected = (
        "ONNX Runtime could not train DiffClassifier: There was an error while exporting the PyTorch model to ONNX: "
        "torch.onnx.errors.UnsupportedOperatorError: Exporting the operator 'aten::diff' to ONNX opset version 17 "
        "is not supported."
    )
    trainer = ORTTrainer(model=DiffClassifier(), args=cpu_args(max_steps=2), train_dataset=tiny_dataset("bert"))
    with pytest.raises(ORTTrainingError) as raised:
        trainer.train()
    assert str(raised.value).startswith(expected + " To fix: pass `--ort_fallback pytorch`")

    args = cpu_args("fallback", max_steps=2, ort_fallback="pytorch")
    trainer = ORTTrainer(model=DiffClassifier(), args=args, train_dataset=tiny_dataset("bert"))
    with caplog.at_level("WARNING", logger="ort_trainer"):
        trainer.train()
    assert f"{expected} Training continues in PyTorch (`--ort_fallback pytorch`)." in caplog.text


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch < 2.8 raises device errors as RuntimeError")
def test_a_device_failure_after_an_ort_failure_is_not_called_a_data_error(cpu_args, monkeypatch):
    """An ONNX Runtime failure on CUDA (a CUDA graph it could not capture) can leave the device in an error state
    that the batch's second run, in PyTorch, meets: that says nothing of the data, and PyTorch cannot take over."""
    trainer = ORTTrainer(model=DiffClassifier(), args=cpu_args(max_steps=2), train_dataset=tiny_dataset("bert"))
    compute_loss = trainer.compute_loss

    def device_fails_in_pytorch(model, *args, **kwargs):
        if not torch.is_grad_enabled():  # the second run, in PyTorch
            raise torch.AcceleratorError("CUDA error: operation not permitted when stream is capturing")
        return compute_loss(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", device_fails_in_pytorch)
    with pytest.raises(ORTTrainingError) as raised:
        trainer.train()
    assert str(raised.value) == (
        "ONNX Runtime could not train DiffClassifier: There was an error while exporting the PyTorch model to ONNX: "
        "torch.onnx.errors.UnsupportedOperatorError: Exporting the operator 'aten::diff' to ONNX opset version 17 "
        "is not supported. PyTorch then failed on the device too (CUDA error: operation not permitted when stream "
        "is capturing), so it cannot take over in this process. To fix: `--use_ort False`."
    )


def uneven_causal_lm_rows(size=32):
    """Rows with 3 to 12 real tokens padded to 12: gradient accumulation must weigh tokens, not micro-batches."""
    rows = tiny_dataset("gpt2", size=size)
    for index, row in enumerate(rows):
        length = 3 + index * 7 % (SEQ - 2)
        row["attention_mask"] = (torch.arange(SEQ) < length).long()
        row["labels"] = torch.where(row["attention_mask"].bool(), row["input_ids"], -100)
    return rows


def test_gradient_accumulation_4_by_2_equals_1_by_8_in_ort(cpu_args):
    trainers = {}
    for batch, steps in ((2, 4), (8, 1)):
        args = cpu_args(
            f"{batch}x{steps}", max_steps=3, per_device_train_batch_size=batch, gradient_accumulation_steps=steps
        )
        trainers[batch] = ORTTrainer(model=tiny_model("gpt2"), args=args, train_dataset=uneven_causal_lm_rows())
        trainers[batch].train()
        assert trained_in_ort(trainers[batch])
    assert_same_weights(trainers[2].model, trainers[8].model, atol=1e-5)
    losses = {
        batch: [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
        for batch, trainer in trainers.items()
    }
    assert losses[2] == pytest.approx(losses[8], abs=1e-5)


def test_checkpoint_of_ort_training_resumes_in_pytorch_with_the_same_weights(cpu_args, tmp_path):
    uninterrupted = ORTTrainer(
        model=tiny_model("bert"), args=cpu_args("full", max_steps=8), train_dataset=tiny_dataset("bert")
    )
    uninterrupted.train()
    args = cpu_args("ort", max_steps=8, save_strategy="steps", save_steps=4)
    interrupted = ORTTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"))
    interrupted.train()
    assert trained_in_ort(interrupted) and trained_in_ort(uninterrupted)

    pytorch_args = cpu_args("ort", max_steps=8, use_ort=False)
    resumed = ORTTrainer(model=tiny_model("bert"), args=pytorch_args, train_dataset=tiny_dataset("bert"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "ort" / "checkpoint-4"))
    assert not is_ortmodule(resumed.accelerator.unwrap_model(resumed.model_wrapped))
    assert resumed.state.global_step == 8
    assert_same_weights(resumed.model, uninterrupted.model, atol=1e-5)
