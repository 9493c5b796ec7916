"""Sequence-to-sequence models in ONNX Runtime: an encoder session, a session for the decoder's cross-attention keys
and values, and two decoder sessions (the first step, and each later step with the past keys and values), put in
place of the model's own encoder and forward while `model.generate` runs. transformers keeps driving greedy and beam
search with the model's generation config; every token comes out of ONNX Runtime, and each new token costs one
decoder step."""

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from . import onnx
from .transformers_compat import (
    BaseModelOutput,
    FilledCache,
    Seq2SeqLMOutput,
    SessionCache,
    attention,
    cache_argument,
    cross_attention_layers,
    encoder_decoder_cache,
    given_cache,
    output_cache,
    self_attention_layers,
)

GRAPHS = ("encoder", "cross_attention", "decoder", "decoder_with_past")
SELF_ATTENTION, CROSS_ATTENTION = ("key", "value"), ("cross_key", "cross_value")


def _past_names(layers: int, prefix: str, kinds: tuple) -> list:
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in kinds]


def _pairs(tensors) -> list:
    """Keys and values, one (key, value) pair per layer."""
    return [tuple(tensors[i : i + 2]) for i in range(0, len(tensors), 2)]


class _Encoder(torch.nn.Module):
    """The encoder alone, returning its last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model.get_encoder()  # `model`, as export errors name the wrapped module

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _CrossAttention(torch.nn.Module):
    """Every decoder layer's cross-attention keys and values, projected from the encoder's output: computed once per
    sentence here, where the decoder's first step would compute them once per beam."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, encoder_hidden_states):
        # Any first token: the export keeps only what leads to the outputs, the projections of the encoder's output.
        token = torch.zeros_like(encoder_hidden_states[:, :1, 0], dtype=torch.long)
        outputs = self.model(
            decoder_input_ids=token, encoder_outputs=(encoder_hidden_states,), use_cache=True, return_dict=True
        )
        return tuple(tensor for layer in cross_attention_layers(output_cache(outputs)) for tensor in layer)


class _Decoder(torch.nn.Module):
    """The decoder and LM head, taking the cross-attention keys and values (and, after the first step, the
    self-attention ones) and returning the self-attention keys and values with the new tokens'."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, decoder_input_ids, encoder_attention_mask, encoder_hidden_states, *past):
        if self.with_past:  # each layer's key, value, cross-attention key and value
            layers = [past[i : i + 4] for i in range(0, len(past), 4)]
            self_attention = FilledCache([(key, value) for key, value, _, _ in layers])
            cross_attention = FilledCache([(key, value) for _, _, key, value in layers])
        else:
            self_attention, cross_attention = DynamicCache(), FilledCache(_pairs(past))
        outputs = self.model(
            decoder_input_ids=decoder_input_ids, attention_mask=encoder_attention_mask,
            encoder_outputs=(encoder_hidden_states,), use_cache=True, return_dict=True,
            **cache_argument(encoder_decoder_cache(self_attention, cross_attention)),
        )
        present = [tensor for layer in self_attention_layers(output_cache(outputs)) for tensor in layer]
        return (outputs.logits, *present)


def _decoder_layers(model) -> int:
    config = model.config
    return getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or config.num_layers


@contextlib.contextmanager
def _exportable(model):
    """In eval mode, without gradients, with eager attention (SDPA's masking shortcuts are decided in Python and
    would be traced as constants of the sample's shape); the model's own settings come back afterwards."""
    with attention(model, "eager"), onnx.evaluating(model):
        yield


def export_seq2seq(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, directory: Path) -> None:
    """Export the encoder, the cross-attention projections of its output, the first decoder step and the decoder
    step with past keys and values."""
    layers = _decoder_layers(model)
    encoder, cross_attention = _Encoder(model), _CrossAttention(model)
    decoder, decoder_with_past = _Decoder(model, with_past=False), _Decoder(model, with_past=True)
    batch = input_ids.shape[0]
    start = torch.full((batch, 2), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    with _exportable(model):
        # Sample inputs for each graph, from the graphs before it.
        hidden = encoder(input_ids, attention_mask)
        cross = cross_attention(hidden)
        first = decoder(start, attention_mask, hidden, *cross)
    past = [tensor for self_kv, cross_kv in zip(_pairs(first[1:]), _pairs(cross)) for tensor in (*self_kv, *cross_kv)]
    step = start[:, :1]
    sequence = {0: "batch", 1: "source"}
    decoder_inputs = ["decoder_input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    specs = {
        "encoder": (
            encoder, (input_ids, attention_mask), ["input_ids", "attention_mask"], ["last_hidden_state"],
            {"input_ids": sequence, "attention_mask": sequence, "last_hidden_state": sequence},
        ),
        "cross_attention": (
            cross_attention, (hidden,), ["encoder_hidden_states"],
            _past_names(layers, "present", CROSS_ATTENTION),
            {"encoder_hidden_states": sequence}
            | {name: {0: "batch", 2: "source"} for name in _past_names(layers, "present", CROSS_ATTENTION)},
        ),
        "decoder": (
            decoder, (start, attention_mask, hidden, *cross),
            [*decoder_inputs, *_past_names(layers, "past", CROSS_ATTENTION)],
            ["logits", *_past_names(layers, "present", SELF_ATTENTION)],
            {"decoder_input_ids": {0: "batch", 1: "target"}, "encoder_attention_mask": sequence,
             "encoder_hidden_states": sequence, "logits": {0: "batch", 1: "target"}}
            | {name: {0: "batch", 2: "source"} for name in _past_names(layers, "past", CROSS_ATTENTION)}
            | {name: {0: "batch", 2: "target"} for name in _past_names(layers, "present", SELF_ATTENTION)},
        ),
        "decoder_with_past": (
            decoder_with_past, (step, attention_mask, hidden, *past),
            [*decoder_inputs, *_past_names(layers, "past", SELF_ATTENTION + CROSS_ATTENTION)],
            ["logits", *_past_names(layers, "present", SELF_ATTENTION)],
            {"decoder_input_ids": {0: "batch", 1: "step"}, "encoder_attention_mask": sequence,
             "encoder_hidden_states": sequence, "logits": {0: "batch", 1: "step"}}
            | {name: {0: "batch", 2: "source"} for name in _past_names(layers, "past", CROSS_ATTENTION)}
            | {name: {0: "batch", 2: "past"} for name in _past_names(layers, "past", SELF_ATTENTION)}
            | {name: {0: "batch", 2: "past + step"} for name in _past_names(layers, "present", SELF_ATTENTION)},
        ),
    }
    with _exportable(model):
        for name, (module, args, input_names, output_names, axes) in specs.items():
            onnx.export_module(module, args, input_names, output_names, axes, directory / f"{name}.onnx")


@dataclass
class _EncoderOutput(BaseModelOutput):
    """The encoder's output and, one row per sentence, the decoder's cross-attention keys and values."""

    cross_attention: tuple | None = None


@dataclass
class ONNXSeq2SeqModel:
    """The encoder and decoder sessions of an exported sequence-to-sequence model."""

    encoder: onnx.ONNXModel
    cross_attention: onnx.ONNXModel
    decoder: onnx.ONNXModel
    decoder_with_past: onnx.ONNXModel

    @property
    def provider(self) -> str:
        return self.encoder.provider

    @property
    def sessions(self) -> tuple:
        return self.encoder, self.cross_attention, self.decoder, self.decoder_with_past

    def encode(self, input_ids, attention_mask) -> _EncoderOutput:
        hidden = self.encoder({"input_ids": input_ids, "attention_mask": attention_mask})["last_hidden_state"]
        return _EncoderOutput(last_hidden_state=hidden, cross_attention=self._project(hidden))

    def _project(self, encoder_hidden_states) -> tuple:
        return tuple(self.cross_attention({"encoder_hidden_states": encoder_hidden_states}).values())

    def _cross_attention_of(self, encoder_outputs) -> tuple:
        """The cross-attention keys and values for each row of `encoder_outputs`, which beam search repeats for
        each beam of a sentence: projected once per sentence and repeated alike."""
        hidden, projected = encoder_outputs[0], getattr(encoder_outputs, "cross_attention", None)
        if projected is None:  # an encoder output from elsewhere
            return self._project(hidden)
        beams = hidden.shape[0] // projected[0].shape[0]
        return projected if beams == 1 else tuple(tensor.repeat_interleave(beams, dim=0) for tensor in projected)

    def decode(self, decoder_input_ids, encoder_attention_mask, encoder_outputs, cache: SessionCache | None):
        """Logits for `decoder_input_ids` and the cache with their keys and values: the first step when `cache`
        is empty, else one step per new token with the cached ones (the session returns the past with the new)."""
        inputs = {
            "decoder_input_ids": decoder_input_ids, "encoder_attention_mask": encoder_attention_mask,
            "encoder_hidden_states": encoder_outputs[0],
        }
        if cache is None or cache.get_seq_length() == 0:
            cross_attention = self._cross_attention_of(encoder_outputs)
            names = _past_names(len(cross_attention) // 2, "past", CROSS_ATTENTION)
            logits, *present = self.decoder(inputs | dict(zip(names, cross_attention))).values()
            return logits, SessionCache(_pairs(present), _pairs(cross_attention))
        layers = [
            (*self_kv, *cross_kv) for self_kv, cross_kv in zip(self_attention_layers(cache), cross_attention_layers(cache))
        ]
        names = _past_names(len(layers), "past", SELF_ATTENTION + CROSS_ATTENTION)
        inputs |= dict(zip(names, (tensor for layer in layers for tensor in layer)))
        logits, *present = self.decoder_with_past(inputs).values()
        for layer, (key, value) in enumerate(_pairs(present)):
            cache.self_attention_cache.update(key, value, layer)
        return logits, cache

    def forward(self, model, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                labels=None, **kwargs):
        """The model's `forward` for generation and evaluation, computed in ONNX Runtime."""
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits, cache = self.decode(decoder_input_ids, attention_mask, encoder_outputs, given_cache(kwargs))
        loss = None
        if labels is not None:  # the loss T5 and BART compute
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(
            loss=loss, logits=logits, encoder_last_hidden_state=encoder_outputs[0], **cache_argument(cache)
        )


class _EncoderInSession(torch.nn.Module):
    """What `model.get_encoder()` returns while ONNX Runtime generates."""

    def __init__(self, onnx_model: ONNXSeq2SeqModel):
        super().__init__()
        self.onnx_model = onnx_model

    def forward(self, input_ids=None, attention_mask=None, **unused):
        return self.onnx_model.encode(input_ids, attention_mask)


@contextlib.contextmanager
def running_in_session(model, onnx_model: ONNXSeq2SeqModel):
    """Inside, `model(...)`, `model.get_encoder()` and so `model.generate(...)` compute in ONNX Runtime; the model's
    own modules are not called."""
    saved = {name: model.__dict__[name] for name in ("forward", "get_encoder") if name in model.__dict__}
    encoder = _EncoderInSession(onnx_model)
    # With the model's signature, which `generate` checks its arguments against.
    model.forward = functools.wraps(model.forward)(lambda *args, **kwargs: onnx_model.forward(model, *args, **kwargs))
    model.get_encoder = lambda *args, **kwargs: encoder
    try:
        yield
    finally:
        for name in ("forward", "get_encoder"):
            del model.__dict__[name]
        model.__dict__.update(saved)


def load_seq2seq_onnx_model(model, input_ids, attention_mask, directory: Path, fp16: bool = False) -> ONNXSeq2SeqModel:
    """The encoder and decoder sessions of `model`, exported into `directory` (reused while the weights and config
    are unchanged); fp16 when `fp16` and running on CUDA, inputs and outputs in their own types."""
    device, provider, fp16 = onnx.session_target(model, fp16)
    directory = Path(directory)
    key = onnx.export_key(model, graphs=list(GRAPHS), provider=provider, fp16=fp16)

    def export() -> list:
        export_seq2seq(model, input_ids, attention_mask, directory)
        return [onnx.convert_to_fp16(directory / f"{graph}.onnx") if fp16 else f"{graph}.onnx" for graph in GRAPHS]

    graphs = onnx.reuse_or_export(directory, key, export)
    precision = "fp16" if fp16 else "fp32"
    sessions = (onnx.ONNXModel.open(directory / graph, provider, device, precision) for graph in graphs)
    return ONNXSeq2SeqModel(*sessions)
