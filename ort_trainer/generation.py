"""Sequence-to-sequence models in ONNX Runtime: an encoder session and two decoder sessions (the first step, and
each later step with the past keys and values), put in place of the model's own encoder and forward while
`model.generate` runs. transformers keeps driving greedy and beam search with the model's generation config; every
token comes out of ONNX Runtime, and each new token costs one decoder step."""

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Cache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from . import onnx
from .import_utils import onnxruntime_providers

GRAPHS = ("encoder", "decoder", "decoder_with_past")


class _Encoder(torch.nn.Module):
    """The encoder alone, returning its last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model.get_encoder()  # `model`, as export errors name the wrapped module

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _Decoder(torch.nn.Module):
    """The decoder and LM head; the first step computes the cross-attention keys and values, later steps take
    them back with the self-attention ones."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, decoder_input_ids, encoder_attention_mask, encoder_hidden_states, *past):
        cache = EncoderDecoderCache([past[i : i + 4] for i in range(0, len(past), 4)] if self.with_past else [])
        outputs = self.model(
            decoder_input_ids=decoder_input_ids, attention_mask=encoder_attention_mask,
            encoder_outputs=(encoder_hidden_states,), past_key_values=cache, use_cache=True, return_dict=True,
        )
        present = []
        for key, value, _, cross_key, cross_value, _ in outputs.past_key_values:
            present += [key, value] if self.with_past else [key, value, cross_key, cross_value]
        return (outputs.logits, *present)


def _past_names(layers: int, prefix: str, with_cross: bool) -> list:
    kinds = ("key", "value", "cross_key", "cross_value") if with_cross else ("key", "value")
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in kinds]


def _decoder_layers(model) -> int:
    config = model.config
    return getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or config.num_layers


@contextlib.contextmanager
def _exportable(model):
    """In eval mode, without gradients, with eager attention (SDPA's masking shortcuts are decided in Python and
    would be traced as constants of the sample's shape); the model's own settings come back afterwards."""
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with onnx.evaluating(model):
            yield
    finally:
        model.set_attn_implementation(attention)


def export_seq2seq(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, directory: Path) -> None:
    """Export the encoder, the first decoder step and the decoder step with past keys and values."""
    layers = _decoder_layers(model)
    batch = input_ids.shape[0]
    start = torch.full((batch, 2), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    with _exportable(model):
        hidden = _Encoder(model)(input_ids, attention_mask)
        first = _Decoder(model, with_past=False)(start, attention_mask, hidden)
    step = start[:, :1]
    sequence = {0: "batch", 1: "source"}
    specs = {
        "encoder": (
            _Encoder(model), (input_ids, attention_mask), ["input_ids", "attention_mask"], ["last_hidden_state"],
            {"input_ids": sequence, "attention_mask": sequence, "last_hidden_state": sequence},
        ),
        "decoder": (
            _Decoder(model, with_past=False), (start, attention_mask, hidden),
            ["decoder_input_ids", "encoder_attention_mask", "encoder_hidden_states"],
            ["logits", *_past_names(layers, "present", with_cross=True)],
            {"decoder_input_ids": {0: "batch", 1: "target"}, "encoder_attention_mask": sequence,
             "encoder_hidden_states": sequence, "logits": {0: "batch", 1: "target"}}
            | {name: {0: "batch", 2: "source" if "cross" in name else "target"}
               for name in _past_names(layers, "present", with_cross=True)},
        ),
        "decoder_with_past": (
            _Decoder(model, with_past=True), (step, attention_mask, hidden, *first[1:]),
            ["decoder_input_ids", "encoder_attention_mask", "encoder_hidden_states",
             *_past_names(layers, "past", with_cross=True)],
            ["logits", *_past_names(layers, "present", with_cross=False)],
            {"decoder_input_ids": {0: "batch", 1: "step"}, "encoder_attention_mask": sequence,
             "encoder_hidden_states": sequence, "logits": {0: "batch", 1: "step"}}
            | {name: {0: "batch", 2: "source" if "cross" in name else "past"}
               for name in _past_names(layers, "past", with_cross=True)}
            | {name: {0: "batch", 2: "past + step"} for name in _past_names(layers, "present", with_cross=False)},
        ),
    }
    directory.mkdir(parents=True, exist_ok=True)
    with _exportable(model):
        for name, (module, args, input_names, output_names, axes) in specs.items():
            onnx.export_module(module, args, input_names, output_names, axes, directory / f"{name}.onnx")


class _SessionLayer(DynamicLayer):
    """A cache layer holding the keys and values a session returned, past ones included: kept as they are, where
    PyTorch's layer would concatenate a copy."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        self.keys, self.values = key_states, value_states
        return self.keys, self.values


class _SessionLayers(Cache):
    """Keys and values of every decoder layer, as sessions return them."""

    def __init__(self, keys_and_values: list):
        super().__init__(layers=[_SessionLayer() for _ in keys_and_values])
        for index, (key, value) in enumerate(keys_and_values):
            self.update(key, value, index)

    def __iter__(self):  # as `DynamicCache` iterates, which `EncoderDecoderCache` relies on
        for layer in self.layers:
            yield layer.keys, layer.values, None


class _SessionCache(EncoderDecoderCache):
    """The decoder sessions' keys and values, for `generate` to carry between steps. Beam search reorders rows only
    among the beams of one sentence, whose cross-attention keys and values are equal copies of one encoder output:
    only the self-attention part needs reordering."""

    def __init__(self, layers: list):
        self_attention = _SessionLayers([(key, value) for key, value, _, _ in layers])
        cross_attention = _SessionLayers([(cross_key, cross_value) for _, _, cross_key, cross_value in layers])
        super().__init__(self_attention, cross_attention)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.self_attention_cache.reorder_cache(beam_idx)


@dataclass
class ONNXSeq2SeqModel:
    """The encoder and decoder sessions of an exported sequence-to-sequence model."""

    encoder: onnx.ONNXModel
    decoder: onnx.ONNXModel
    decoder_with_past: onnx.ONNXModel

    @property
    def provider(self) -> str:
        return self.encoder.provider

    @property
    def sessions(self) -> tuple:
        return self.encoder, self.decoder, self.decoder_with_past

    def encode(self, input_ids, attention_mask) -> torch.Tensor:
        return self.encoder({"input_ids": input_ids, "attention_mask": attention_mask})["last_hidden_state"]

    def decode(self, decoder_input_ids, encoder_attention_mask, encoder_hidden_states, cache: EncoderDecoderCache):
        """Logits for `decoder_input_ids` and the cache with their keys and values: the first step when `cache`
        is empty, else one step per new token with the cached ones (the session returns the past with the new)."""
        inputs = {
            "decoder_input_ids": decoder_input_ids, "encoder_attention_mask": encoder_attention_mask,
            "encoder_hidden_states": encoder_hidden_states,
        }
        if cache is None or cache.get_seq_length() == 0:
            logits, *present = self.decoder(inputs).values()
            return logits, _SessionCache([present[i : i + 4] for i in range(0, len(present), 4)])
        layers = [(key, value, cross_key, cross_value) for key, value, _, cross_key, cross_value, _ in cache]
        names = _past_names(len(layers), "past", with_cross=True)
        inputs |= dict(zip(names, (tensor for layer in layers for tensor in layer)))
        logits, *present = self.decoder_with_past(inputs).values()
        for layer in range(len(layers)):
            cache.self_attention_cache.update(present[2 * layer], present[2 * layer + 1], layer)
        return logits, cache

    def forward(self, model, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                past_key_values=None, labels=None, **unused):
        """The model's `forward` for generation and evaluation, computed in ONNX Runtime."""
        if encoder_outputs is None:
            encoder_outputs = BaseModelOutput(last_hidden_state=self.encode(input_ids, attention_mask))
        hidden = encoder_outputs[0]
        if decoder_input_ids is None:
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits, cache = self.decode(decoder_input_ids, attention_mask, hidden, past_key_values)
        loss = None
        if labels is not None:  # the loss T5 and BART compute
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, past_key_values=cache, encoder_last_hidden_state=hidden)


class _EncoderInSession(torch.nn.Module):
    """What `model.get_encoder()` returns while ONNX Runtime generates."""

    def __init__(self, onnx_model: ONNXSeq2SeqModel):
        super().__init__()
        self.onnx_model = onnx_model

    def forward(self, input_ids=None, attention_mask=None, **unused):
        return BaseModelOutput(last_hidden_state=self.onnx_model.encode(input_ids, attention_mask))


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
    device = next(model.parameters()).device
    provider = onnx.select_provider(device, onnxruntime_providers())
    directory = Path(directory)
    fp16 = fp16 and provider == "CUDAExecutionProvider"
    key = onnx.export_key(model, graphs=list(GRAPHS), provider=provider, fp16=fp16)

    def export() -> list:
        export_seq2seq(model, input_ids, attention_mask, directory)
        return [onnx.convert_to_fp16(directory / f"{graph}.onnx") if fp16 else f"{graph}.onnx" for graph in GRAPHS]

    graphs = onnx.reuse_or_export(directory, key, export)
    precision = "fp16" if fp16 else "fp32"
    sessions = (onnx.ONNXModel.open(directory / graph, provider, device, precision) for graph in graphs)
    return ONNXSeq2SeqModel(*sessions)
