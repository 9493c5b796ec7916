"""ORTTrainer beyond parity: checkpoints, resuming, plain nn.Modules, the loss inside the graph, bad settings."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from ort_trainer import ORTTrainer, ORTTrainingArguments
from ort_trainer.ortmodule import ORTTrainingError, is_ortmodule, ortmodule_status

from .tiny_models import tiny_dataset, tiny_model


def ort_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        ort_fallback="error",
        save_strategy="no",
    )
    values.update(overrides)
    return ORTTrainingArguments(**values)


def test_checkpoints_are_plain_transformers_and_resume_matches(tmp_path):
    full = ORTTrainer(
        model=tiny_model("bert"), args=ort_args(tmp_path / "full", max_steps=8), train_dataset=tiny_dataset("bert")
    )
    full_loss = full.train().training_loss

    args = ort_args(tmp_path / "resumed", max_steps=8, save_strategy="steps", save_steps=4)
    interrupted = ORTTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"))
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-4"
    assert is_ortmodule(interrupted.model_wrapped) and not is_ortmodule(interrupted.model)

    # An ordinary Hugging Face checkpoint: the config a plain Trainer saves, weights transformers loads alone.
    plain_args = TrainingArguments(output_dir=str(tmp_path / "plain"), report_to=[], max_steps=1, save_strategy="no")
    plain = Trainer(model=tiny_model("bert"), args=plain_args, train_dataset=tiny_dataset("bert"))
    plain.train()
    plain.save_model()
    assert json.loads((checkpoint / "config.json").read_text()) == json.loads(
        (tmp_path / "plain" / "config.json").read_text()
    )
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert reloaded.config._attn_implementation == tiny_model("bert").config._attn_implementation

    resumed = ORTTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"))
    resumed_loss = resumed.train(resume_from_checkpoint=str(checkpoint)).training_loss
    assert ortmodule_status(resumed.model_wrapped).backend == "onnxruntime"
    final_full = full.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, final_full[key], atol=1e-5, rtol=0, msg=key)
    # training_loss averages the steps this run made: the resumed run made steps 5-8 only.
    assert resumed.state.log_history[-1]["train_loss"] == pytest.approx(resumed_loss)
    assert full.state.global_step == resumed.state.global_step == 8
    assert math.isfinite(full_loss)


def test_user_model_settings_come_back_after_training(tmp_path):
    model = tiny_model("t5")
    trainer = ORTTrainer(model=model, args=ort_args(tmp_path, max_steps=2), train_dataset=tiny_dataset("t5"))
    before = [module.config.use_cache for module in model.modules() if hasattr(module, "config")]
    assert True in before  # the decoder's own config copy keeps use_cache on
    attention = model.config._attn_implementation
    assert attention == "sdpa"
    trainer.train()
    assert [module.config.use_cache for module in model.modules() if hasattr(module, "config")] == before
    assert model.config._attn_implementation == attention


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(dim, dim=2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        attended = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class TinyLanguageModel(torch.nn.Module):
    """A plain nn.Module language model, as in ORT's getting-started sample: embedding, sinusoidal positional
    encoding, transformer blocks, linear head; it returns logits only and the loss comes from `compute_loss_func`."""

    def __init__(self, vocab=96, dim=32, length=12, layers=2):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, dim)
        position = torch.arange(length).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        encoding = torch.zeros(length, dim)
        encoding[:, 0::2], encoding[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
        self.register_buffer("positional_encoding", encoding)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "norm1": torch.nn.LayerNorm(dim),
                    "attention": CausalSelfAttention(dim, heads=2),
                    "norm2": torch.nn.LayerNorm(dim),
                    "mlp": torch.nn.Sequential(
                        torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
                    ),
                }
            )
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids):
        hidden = self.embedding(input_ids) + self.positional_encoding[: input_ids.shape[1]]
        for block in self.blocks:
            hidden = hidden + block["attention"](block["norm1"](hidden))
            hidden = hidden + block["mlp"](block["norm2"](hidden))
        return {"logits": self.head(hidden)}


class TransformerEncoderClassifier(torch.nn.Module):
    """`torch.nn.TransformerEncoder` exports a shape subgraph (a Mod of constants) that ONNX Runtime 1.19's
    symbolic shape inference cannot resolve, so ORT cannot train it."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(96, 32)
        layer = torch.nn.TransformerEncoderLayer(32, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.encoder(self.embedding(input_ids)).mean(1))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_model_ort_cannot_train_fails_clearly_without_fallback(tmp_path):
    trainer = ORTTrainer(
        model=TransformerEncoderClassifier(), args=ort_args(tmp_path, max_steps=2), train_dataset=tiny_dataset("bert")
    )
    with pytest.raises(ORTTrainingError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        "ONNX Runtime could not train TransformerEncoderClassifier: AssertionError in symbolic_shape_infer.py"
    )
    assert message.endswith(
        "To fix: pass `--ort_fallback pytorch` to train in PyTorch when ORT cannot, or `--use_ort False`."
    )
    assert not any((tmp_path / "out").iterdir())  # Trainer makes the folder; nothing is written into it


def test_model_ort_cannot_train_falls_back_to_pytorch_with_a_warning(tmp_path, caplog):
    args = ort_args(tmp_path, max_steps=2, ort_fallback="pytorch")
    trainer = ORTTrainer(model=TransformerEncoderClassifier(), args=args, train_dataset=tiny_dataset("bert"))
    with caplog.at_level("WARNING", logger="ort_trainer"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert not is_ortmodule(trainer.accelerator.unwrap_model(trainer.model_wrapped))
    assert (
        "ONNX Runtime could not train TransformerEncoderClassifier: AssertionError in symbolic_shape_infer.py:"
        "_infer_Reshape. Training continues in PyTorch (`--ort_fallback pytorch`)." in caplog.text
    )
    assert "Training backend: PyTorch on cpu, not ONNX Runtime." in caplog.text


def next_token_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs["logits"][:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def repeating_sequences(size=64):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(size):
        start = torch.randint(3, 90, (1,), generator=generator)
        ids = (start + torch.arange(12) % 4).long()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


@pytest.mark.parametrize("use_module_with_loss", [False, True])
def test_plain_module_with_compute_loss_func_learns_under_ort(tmp_path, use_module_with_loss):
    torch.manual_seed(0)
    trainer = ORTTrainer(
        model=TinyLanguageModel(),
        args=ort_args(
            tmp_path,
            num_train_epochs=8,
            learning_rate=1e-2,
            logging_steps=8,
            label_names=["labels"],
            use_module_with_loss=use_module_with_loss,
        ),
        train_dataset=repeating_sequences(),
        compute_loss_func=next_token_loss,
    )
    trainer.train()
    assert ortmodule_status(trainer.accelerator.unwrap_model(trainer.model_wrapped)).backend == "onnxruntime"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0], losses


def test_loss_inside_the_graph_matches_pytorch(tmp_path):
    """With `--use_module_with_loss` the label-smoothed loss is exported with the model; it equals Trainer's."""
    common = dict(max_steps=4, label_smoothing_factor=0.1)
    reference = Trainer(
        model=tiny_model("bert"),
        args=TrainingArguments(
            output_dir=str(tmp_path / "torch"),
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            seed=0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            **common,
        ),
        train_dataset=tiny_dataset("bert"),
    )
    reference.train()
    ort = ORTTrainer(
        model=tiny_model("bert"),
        args=ort_args(tmp_path, use_module_with_loss=True, **common),
        train_dataset=tiny_dataset("bert"),
    )
    ort.train()
    wrapped = ort.accelerator.unwrap_model(ort.model_wrapped)
    assert type(wrapped.module).__name__ == "_ModelWithLoss"
    assert ortmodule_status(wrapped).backend == "onnxruntime"
    for key, value in ort.model.state_dict().items():
        torch.testing.assert_close(value, reference.model.state_dict()[key], atol=1e-4, rtol=0, msg=key)


def test_torch_onnx_export_keeps_torch_defaults_after_ort_training(tmp_path):
    import inspect

    dynamo_default = inspect.signature(torch.onnx.export).parameters["dynamo"].default
    ORTTrainer(
        model=tiny_model("bert"), args=ort_args(tmp_path, max_steps=1), train_dataset=tiny_dataset("bert")
    ).train()
    assert inspect.signature(torch.onnx.export).parameters["dynamo"].default == dynamo_default
    model = tiny_model("bert").eval()
    path = tmp_path / "user.onnx"
    torch.onnx.export(model, (torch.ones(1, 4, dtype=torch.long),), str(path), dynamo=False, opset_version=17)
    import onnx

    assert {node.domain for node in onnx.load(path).graph.node} == {""}


def test_failed_extension_build_says_why_and_what_to_install(tmp_path):
    import os
    import subprocess
    import sys

    environment = {**os.environ, "ORT_TRAINER_CACHE": str(tmp_path), "CXX": "/nonexistent/c++"}
    result = subprocess.run(
        [sys.executable, "-c", "from ort_trainer.ortmodule import load_ortmodule; load_ortmodule()"],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "ort_trainer.ortmodule.ORTTrainingUnavailableError: Could not compile ONNX Runtime's aten_op_executor "
        "extension in "
    )
    assert "/nonexistent/c++: not found. To fix: install a C++ compiler and Python headers" in last_line
