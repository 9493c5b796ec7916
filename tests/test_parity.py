"""ORTTrainer trains exactly as transformers.Trainer does, with ONNX Runtime really running the graph, through either
backend. `ORT_TRAINER_TEST_BACKENDS=compile` runs only the compile backend (builds without onnxruntime-training)."""

import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ort_trainer import ORTTrainer, ORTTrainingArguments, compile_backend
from ort_trainer.ortmodule import ortmodule_status

from .tiny_models import TASKS, tiny_dataset, tiny_model


STEPS = 5
BACKENDS = os.environ.get("ORT_TRAINER_TEST_BACKENDS", "ortmodule,compile").split(",")


def recording(trainer_class):
    class Recording(trainer_class):
        """Records each training loss and which backend computed it: ORTModule's status, or for the compile
        backend whether an ONNX Runtime session ran during the forward."""

        losses, backends = [], []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            runs = compile_backend.stats.session_runs
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                self.losses.append(loss.item())
                if getattr(self.args, "ort_backend", None) == "compile":
                    ran_in_ort = compile_backend.stats.session_runs > runs
                    self.backends.append("onnxruntime" if ran_in_ort else "pytorch")
                else:
                    self.backends.append(ortmodule_status(self.accelerator.unwrap_model(model)).backend)
            return loss

    Recording.losses, Recording.backends = [], []
    return Recording


@pytest.fixture(autouse=True)
def compiled_graphs_in_tmp_path(request, tmp_path, monkeypatch):
    """The compile backend's graph cache in the test's own folder (ORTModule's compiled extension stays where it is
    built once)."""
    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend") == "compile":
        monkeypatch.setenv("ORT_TRAINER_CACHE", str(tmp_path / "cache"))


def train(name, tmp_path, backend=None):
    common = dict(
        output_dir=str(tmp_path / (backend or "torch")),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        seed=0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    if backend:
        args = ORTTrainingArguments(ort_fallback="error", ort_backend=backend, **common)
        trainer_class = recording(ORTTrainer)
    else:
        args, trainer_class = TrainingArguments(**common), recording(Trainer)
    trainer = trainer_class(model=tiny_model(name), args=args, train_dataset=tiny_dataset(name))
    trainer.train()
    return trainer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TASKS))
def test_losses_and_weights_match_pytorch(name, backend, tmp_path):
    reference = train(name, tmp_path)
    runs = compile_backend.stats.session_runs
    ort = train(name, tmp_path, backend)

    assert ort.backends == ["onnxruntime"] * STEPS, ort.backends
    if backend == "compile":  # a forward and a backward graph each step, more where graph breaks split the model
        assert compile_backend.stats.session_runs - runs >= 2 * STEPS
    assert len(ort.losses) == len(reference.losses) == STEPS
    assert ort.losses == pytest.approx(reference.losses, abs=1e-4)
    initial = tiny_model(name).state_dict()
    moved = 0.0
    for (key, ort_value), reference_value in zip(
        ort.model.state_dict().items(), reference.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ort_value, reference_value, atol=1e-4, rtol=0, msg=key)
        moved = max(moved, (ort_value.float() - initial[key].float()).abs().max().item())
    assert moved > 1e-3, "the optimizer did not change the weights"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_seq2seq_trainer_trains_like_seq2seq_trainer(name, backend, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from ort_trainer import ORTSeq2SeqTrainingArguments, Seq2SeqORTTrainer

    common = dict(
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        seed=0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        label_smoothing_factor=0.1,
    )
    # With label smoothing the trainer computes the loss, so the batch brings the decoder inputs itself.
    shift = tiny_model(name).prepare_decoder_input_ids_from_labels
    data = [dict(row, decoder_input_ids=shift(labels=row["labels"][None])[0]) for row in tiny_dataset(name)]
    reference = recording(Seq2SeqTrainer)(
        model=tiny_model(name),
        args=Seq2SeqTrainingArguments(output_dir=str(tmp_path / "torch"), **common),
        train_dataset=data,
    )
    reference.train()
    ort = recording(Seq2SeqORTTrainer)(
        model=tiny_model(name),
        args=ORTSeq2SeqTrainingArguments(
            output_dir=str(tmp_path / "ort"), ort_fallback="error", ort_backend=backend, **common
        ),
        train_dataset=data,
    )
    ort.train()
    assert ort.backends == ["onnxruntime"] * STEPS
    assert ort.losses == pytest.approx(reference.losses, abs=1e-4)
