"""Generation in ONNX Runtime: the same tokens as PyTorch's `generate`, and no PyTorch module runs meanwhile."""

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, MarianConfig

from ort_trainer.inference.seq2seq import Seq2SeqLM

from .tiny_models import VOCAB, tiny_model


def marian():
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=None,
    )
    return AutoModelForSeq2SeqLM.from_config(config)


MODELS = {"t5": lambda: tiny_model("t5"), "bart": lambda: tiny_model("bart"), "marian": marian}


def padded_batch(model, rows: int, length: int, seed: int):
    """Token ids with some rows right-padded, as a tokenizer pads a batch."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, rows, 2):
        cut = length - 1 - row % (length - 2)
        input_ids[row, cut:], attention_mask[row, cut:] = model.config.pad_token_id, 0
    return input_ids, attention_mask


def inputs(input_ids, attention_mask) -> dict:
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def pytorch_modules_forbidden():
    """A context in which any call of the model's encoder, decoder or LM head fails the test."""

    def forbid(model):
        def fail(module, args):
            raise AssertionError(f"PyTorch ran {type(module).__name__} during ONNX Runtime generation")

        modules = [model.get_encoder(), model.get_decoder(), model.get_output_embeddings()]
        return [module.register_forward_pre_hook(fail) for module in modules]

    return forbid


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_beams", [1, 4])
def test_onnx_generation_equals_pytorch_token_for_token(name, num_beams, tmp_path, pytorch_modules_forbidden):
    model = MODELS[name]().eval()
    # Exported on one shape, run on others: batch, source length and generated length all differ.
    sample_ids, sample_mask = padded_batch(model, rows=2, length=7, seed=0)
    onnx_model = Seq2SeqLM.load(model, inputs(sample_ids, sample_mask), tmp_path)
    input_ids, attention_mask = padded_batch(model, rows=5, length=13, seed=1)
    # Random weights would often end at once: at least 12 new tokens, so that many steps use the past.
    settings = {"min_new_tokens": 12, "max_new_tokens": 17, "num_beams": num_beams, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    hooks = pytorch_modules_forbidden(model)
    with onnx_model.running(model):
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    for hook in hooks:
        hook.remove()
    assert generated.shape[1] > 10
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_encoder_outputs_passed_in_get_their_cross_attention_from_the_session(
    num_beams, tmp_path, pytorch_modules_forbidden
):
    model = tiny_model("bart").eval()
    onnx_model = Seq2SeqLM.load(model, inputs(*padded_batch(model, 2, 7, seed=0)), tmp_path)
    input_ids, attention_mask = padded_batch(model, rows=3, length=9, seed=3)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    settings = {"min_new_tokens": 8, "max_new_tokens": 10, "num_beams": num_beams, "attention_mask": attention_mask}
    with torch.no_grad():
        expected = model.generate(encoder_outputs=encoder_outputs.copy(), **settings)
    assert not hasattr(encoder_outputs, "cross_attention")  # PyTorch's own output: the session projects it
    hooks = pytorch_modules_forbidden(model)
    with onnx_model.running(model):
        generated = model.generate(encoder_outputs=encoder_outputs.copy(), **settings)
    for hook in hooks:
        hook.remove()
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_onnx_forward_gives_the_models_loss_and_logits(name, tmp_path):
    model = MODELS[name]().eval()
    onnx_model = Seq2SeqLM.load(model, inputs(*padded_batch(model, 2, 7, seed=0)), tmp_path)
    input_ids, attention_mask = padded_batch(model, rows=3, length=11, seed=2)
    labels = torch.randint(3, VOCAB, (3, 9))
    labels[0, 5:] = -100
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with onnx_model.running(model):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(outputs.logits, expected.logits, atol=1e-4, rtol=0)
    assert outputs.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)


def test_the_models_own_forward_and_settings_come_back(tmp_path):
    model = tiny_model("t5").train()
    attention = model.config._attn_implementation
    onnx_model = Seq2SeqLM.load(model, inputs(*padded_batch(model, 2, 7, seed=0)), tmp_path)
    assert model.training and model.config._attn_implementation == attention  # exported in eval, eager: restored
    with onnx_model.running(model):
        assert "forward" in vars(model) and "get_encoder" in vars(model)
    assert "forward" not in vars(model) and "get_encoder" not in vars(model)
    assert model.get_encoder() is model.encoder


def test_export_is_reused_while_the_weights_are_unchanged(tmp_path):
    model = tiny_model("bart").eval()
    sample = padded_batch(model, 2, 7, seed=0)
    Seq2SeqLM.load(model, inputs(*sample), tmp_path)
    exported = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.onnx")}
    assert sorted(exported) == ["cross_attention.onnx", "decoder.onnx", "decoder_with_past.onnx", "encoder.onnx"]
    Seq2SeqLM.load(model, inputs(*sample), tmp_path)
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.onnx")} == exported
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    Seq2SeqLM.load(model, inputs(*sample), tmp_path)
    assert (tmp_path / "decoder.onnx").stat().st_mtime_ns != exported["decoder.onnx"]
