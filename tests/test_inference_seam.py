"""`--inference_with_ort` changes where the model computes, not what the Trainer computes: losses, label smoothing,
`compute_loss_func`, custom `compute_loss` and checkpoint choice equal PyTorch's for every head, and no PyTorch
module of the model runs meanwhile."""

import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification

from ort_trainer import ORTSeq2SeqTrainingArguments, ORTTrainer, Seq2SeqORTTrainer
from ort_trainer.inference.causal_lm import CausalLM

from .test_generation import padded_batch
from .test_inference import padded_rows
from .tiny_models import CONFIGS, tiny_dataset, tiny_model


def token_classifier():
    torch.manual_seed(0)
    config = CONFIGS["bert"]()
    config.num_labels = 3
    return AutoModelForTokenClassification.from_config(config)


def seq2seq_rows(size):
    """With the decoder inputs, as `DataCollatorForSeq2Seq` makes them: the Trainer's label smoothing and
    `compute_loss_func` take the labels away from the model."""
    shift = tiny_model("t5").prepare_decoder_input_ids_from_labels
    return [dict(row, decoder_input_ids=shift(labels=row["labels"][None])[0]) for row in tiny_dataset("t5", size)]


# Each head: a model, evaluation rows and the trainer class.
HEADS = {
    "sequence-classification": (lambda: tiny_model("bert"), lambda: padded_rows(20), ORTTrainer),
    "token-classification": (token_classifier, lambda: padded_rows(20, token_labels=True), ORTTrainer),
    "seq2seq": (lambda: tiny_model("t5"), lambda: seq2seq_rows(20), Seq2SeqORTTrainer),
    "causal-lm": (lambda: tiny_model("gpt2"), lambda: tiny_dataset("gpt2", size=20), ORTTrainer),
}


def decided(model):
    """Random weights predict nearly uniformly, which smoothing barely changes: a sharper head tells losses apart."""
    head = model.get_output_embeddings() or model.classifier
    with torch.no_grad():
        head.weight.mul_(10)
    return model


def smoothed_cross_entropy(outputs, labels, num_items_in_batch=None):
    """A loss of the user's own, unlike any model's: cross-entropy over every position with smoothing."""
    logits = outputs["logits"]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100, label_smoothing=0.2
    )


@pytest.fixture
def pytorch_forbidden():
    """`pytorch_forbidden(model)`: a call of any of the model's submodules while the sessions stand in for its forward
    (exports run the model itself) fails the test."""

    def forbid(model):
        def fail(module, args):
            if "forward" in vars(model):
                raise AssertionError(f"PyTorch ran {type(module).__name__} while evaluating with ONNX Runtime")

        return [child.register_forward_pre_hook(fail) for child in model.children()]

    return forbid


def evaluate(head, cpu_args, inference_with_ort, pytorch_forbidden=None, **settings):
    make_model, rows, trainer_class = HEADS[head]
    args_class = ORTSeq2SeqTrainingArguments if trainer_class is Seq2SeqORTTrainer else None
    args = cpu_args(
        f"{head}-{inference_with_ort}",
        **({"args_class": args_class} if args_class else {}),
        use_ort=False,
        inference_with_ort=inference_with_ort,
        label_smoothing_factor=settings.get("label_smoothing_factor", 0.0),
    )
    model = decided(make_model().eval())
    compute_loss_func = settings.get("compute_loss_func")
    trainer = trainer_class(model=model, args=args, eval_dataset=rows(), compute_loss_func=compute_loss_func)
    hooks = pytorch_forbidden(model) if pytorch_forbidden else []
    try:
        return trainer.evaluate(), trainer.predict(rows())
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    "settings",
    [{"label_smoothing_factor": 0.1}, {"compute_loss_func": smoothed_cross_entropy}],
    ids=["label-smoothing", "compute-loss-func"],
)
@pytest.mark.parametrize("head", list(HEADS))
def test_eval_loss_and_predictions_equal_pytorch(head, settings, cpu_args, pytorch_forbidden, caplog):
    pytorch_metrics, pytorch_prediction = evaluate(head, cpu_args, False, **settings)
    with caplog.at_level(logging.INFO, logger="ort_trainer"):
        ort_metrics, ort_prediction = evaluate(head, cpu_args, True, pytorch_forbidden, **settings)

    assert "backend: ONNX Runtime on CPUExecutionProvider" in caplog.text
    assert ort_metrics["eval_loss"] == pytest.approx(pytorch_metrics["eval_loss"], abs=1e-5)
    # The loss really is the setting's: not the model's own.
    plain_metrics, _ = evaluate(head, cpu_args, False)
    assert abs(plain_metrics["eval_loss"] - pytorch_metrics["eval_loss"]) > 1e-3
    ort_logits, pytorch_logits = (
        np.asarray(p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions)
        for p in (ort_prediction, pytorch_prediction)
    )
    keep = pytorch_prediction.label_ids != -100
    if ort_logits.ndim == 3:  # per token: padding positions predict nothing
        ort_logits, pytorch_logits = ort_logits[keep], pytorch_logits[keep]
    np.testing.assert_array_equal(ort_logits.argmax(-1), pytorch_logits.argmax(-1))
    np.testing.assert_allclose(ort_logits, pytorch_logits, atol=1e-4, rtol=0)


class WeightedLossTrainer(ORTTrainer):
    """A trainer whose loss weighs class 1 ten times as much as class 0, written as users override `compute_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weight = torch.tensor([1.0, 10.0])
        loss = torch.nn.functional.cross_entropy(outputs["logits"], labels, weight=weight)
        return (loss, outputs) if return_outputs else loss


def test_custom_compute_loss_chooses_the_same_best_checkpoint(cpu_args):
    data = padded_rows(64)
    best = {}
    for inference_with_ort in (False, True):
        args = cpu_args(
            f"weighted-{inference_with_ort}",
            use_ort=False,
            inference_with_ort=inference_with_ort,
            max_steps=24,
            learning_rate=5e-3,
            eval_strategy="steps",
            eval_steps=6,
            save_strategy="steps",
            save_steps=6,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
        )
        trainer = WeightedLossTrainer(model=tiny_model("bert"), args=args, train_dataset=data, eval_dataset=data[:24])
        trainer.train()
        losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
        best[inference_with_ort] = (trainer.state.best_model_checkpoint.rsplit("-", 1)[1], losses)
    assert best[True][0] == best[False][0]
    np.testing.assert_allclose(best[True][1], best[False][1], atol=1e-5)


class Net(torch.nn.Module):
    """A model that is not a transformers model: no head `--inference_with_ort` knows."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.EmbeddingBag(96, 2)

    def forward(self, input_ids, attention_mask=None, **unused):
        return {"logits": self.embedding(input_ids)}


def test_a_head_without_sessions_evaluates_in_pytorch_and_says_so(cpu_args, caplog):
    data = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in padded_rows(16)]
    results = {}
    for inference_with_ort in (False, True):
        args = cpu_args(
            f"net-{inference_with_ort}", use_ort=False, inference_with_ort=inference_with_ort, label_names=["labels"]
        )
        torch.manual_seed(0)
        trainer = ORTTrainer(model=Net(), args=args, eval_dataset=data, compute_loss_func=smoothed_cross_entropy)
        with caplog.at_level(logging.WARNING, logger="ort_trainer"):
            results[inference_with_ort] = trainer.evaluate()["eval_loss"]
    assert results[True] == results[False]
    assert [record.getMessage() for record in caplog.records if record.name.startswith("ort_trainer")] == [
        "Evaluation backend: PyTorch on cpu. `--inference_with_ort` runs sequence and token classifiers, "
        "encoder-decoder and decoder-only language models; Net is none of these."
    ]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_causal_lm_generation_equals_pytorch_token_for_token(num_beams, tmp_path, pytorch_forbidden):
    model = tiny_model("gpt2").eval()
    model.config.pad_token_id = model.generation_config.pad_token_id = 0
    # Exported on one shape, run on others; prompts left-padded, as for generation.
    sample_ids, sample_mask = padded_batch(model, rows=2, length=7, seed=0)
    sessions = CausalLM.load(model, {"input_ids": sample_ids, "attention_mask": sample_mask}, tmp_path)
    input_ids, attention_mask = padded_batch(model, rows=5, length=11, seed=1)
    input_ids, attention_mask = input_ids.flip(1), attention_mask.flip(1)
    settings = {"min_new_tokens": 12, "max_new_tokens": 17, "num_beams": num_beams, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    hooks = pytorch_forbidden(model)
    with sessions.running(model):
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    for hook in hooks:
        hook.remove()
    assert generated.shape[1] >= input_ids.shape[1] + 12
    assert torch.equal(generated, expected)
