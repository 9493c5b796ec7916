"""`--trim_padding` in PyTorch runs: fewer tokens computed, the same losses and predictions."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification, Trainer

from ort_trainer import ORTTrainer

from .test_inference import padded_rows
from .tiny_models import CONFIGS, tiny_model


def token_classifier():
    torch.manual_seed(0)
    config = CONFIGS["bert"]()
    config.num_labels = 3
    return AutoModelForTokenClassification.from_config(config)


MODELS = {"sequence": lambda: tiny_model("bert"), "token": token_classifier}


def run(head, cpu_args, trim_padding):
    rows = padded_rows(96, token_labels=head == "token")
    short = [row for row in rows if row["attention_mask"].sum() <= 12][:21]  # padding in every evaluation batch
    args = cpu_args(f"{head}-{trim_padding}", use_ort=False, trim_padding=trim_padding, max_steps=6, logging_steps=1)
    trainer = ORTTrainer(model=MODELS[head](), args=args, train_dataset=rows, eval_dataset=short)
    train = trainer.train().metrics
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return train, losses, trainer.predict(short)


@pytest.mark.parametrize("head", list(MODELS))
def test_trimming_in_pytorch_computes_fewer_tokens_to_the_same_results(head, cpu_args):
    full_train, full_losses, full = run(head, cpu_args, trim_padding=False)
    trimmed_train, trimmed_losses, trimmed = run(head, cpu_args, trim_padding=True)

    # Rows of 3 to 16 real tokens padded to 16: each batch computes only up to its longest row.
    assert full_train["train_computed_tokens_per_sample"] == 16 == full.metrics["test_computed_tokens_per_sample"]
    assert trimmed_train["train_computed_tokens_per_sample"] < 16
    assert trimmed.metrics["test_computed_tokens_per_sample"] < 16
    assert trimmed_train["train_real_tokens_per_sample"] == full_train["train_real_tokens_per_sample"]
    assert trimmed.metrics["test_real_tokens_per_sample"] == full.metrics["test_real_tokens_per_sample"]

    assert len(trimmed_losses) == len(full_losses) == 6
    np.testing.assert_allclose(trimmed_losses, full_losses, atol=1e-5, rtol=0)
    assert trimmed.metrics["test_loss"] == pytest.approx(full.metrics["test_loss"], abs=1e-5)
    keep = full.label_ids != -100
    width = trimmed.predictions.shape[1] if head == "token" else None
    if head == "token":  # trimmed batches are narrower: compare the positions that have labels
        assert np.all(full.label_ids[:, width:] == -100)
        keep, full_predictions = keep[:, :width], full.predictions[:, :width]
        np.testing.assert_array_equal(trimmed.label_ids[keep], full.label_ids[:, :width][keep])
    else:
        full_predictions = full.predictions
    np.testing.assert_allclose(trimmed.predictions[keep], full_predictions[keep], atol=1e-5, rtol=0)


def test_the_collator_trims_on_the_host_so_the_steps_read_no_device_batch(cpu_args, monkeypatch):
    """Trimming reads the attention mask: on a batch already on the GPU that waits for every kernel queued. The
    Trainer's loaders trim as they collate, so training and prediction steps get batches trimmed already."""
    rows = [row for row in padded_rows(96) if row["attention_mask"].sum() <= 12][:32]  # padding in every batch
    trainer = ORTTrainer(model=tiny_model("bert"), args=cpu_args(use_ort=False, max_steps=4), train_dataset=rows)
    monkeypatch.setattr("ort_trainer.trainer.trim_padding", lambda *a, **k: pytest.fail("trimmed in a step"))
    seen = []
    compute_loss = trainer.compute_loss
    monkeypatch.setattr(
        trainer, "compute_loss", lambda model, inputs, **k: seen.append(inputs) or compute_loss(model, inputs, **k)
    )

    trainer.train()
    trainer.predict(rows[:16])

    assert len(seen) == 4 + 2
    for batch in seen:  # as wide as its longest row, not the 16 columns of the data
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) <= 12


def test_the_old_option_name_still_works_and_says_it_is_deprecated(cpu_args):
    with pytest.warns(
        FutureWarning, match="`--ort_trim_padding` is deprecated and will be removed: use `--trim_padding`"
    ):
        args = cpu_args(ort_trim_padding=False)
    assert args.trim_padding is False and args.ort_trim_padding is None


def test_flops_are_the_trainers_with_the_parameters_counted_once_per_batch_shape(cpu_args, monkeypatch):
    model = tiny_model("bert")
    counted, shapes = [], []
    num_parameters, floating_point_ops = type(model).num_parameters, ORTTrainer.floating_point_ops
    monkeypatch.setattr(type(model), "num_parameters", lambda *a, **k: counted.append(1) or num_parameters(*a, **k))
    monkeypatch.setattr(
        ORTTrainer,
        "floating_point_ops",
        lambda self, inputs: shapes.append(inputs["input_ids"].shape) or floating_point_ops(self, inputs),
    )

    def pad_to_longest(rows):
        width = max(int(row["attention_mask"].sum()) for row in rows)
        return {
            name: torch.stack([row[name][:width] if row[name].dim() else row[name] for row in rows])
            for name in rows[0]
        }

    args = cpu_args("flops", use_ort=False, max_steps=8, per_device_train_batch_size=2)
    trainer = ORTTrainer(model=model, args=args, train_dataset=padded_rows(16), data_collator=pad_to_longest)
    trainer.train()

    assert len(shapes) == 8 and 1 < len(set(shapes)) < 8  # batches of a few widths
    assert len(counted) == len(set(shapes))
    trainers_count = sum(Trainer.floating_point_ops(trainer, {"input_ids": torch.zeros(shape)}) for shape in shapes)
    assert trainer.state.total_flos == trainers_count > 0
