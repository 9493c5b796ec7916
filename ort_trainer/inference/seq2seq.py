"""Sequence-to-sequence models in ONNX Runtime: an encoder session, a session for the decoder's cross-attention keys
and values, and two decoder sessions (the first step, and each later step with the past keys and values), put in
place of the model's own encoder and forward while `model.generate` runs. transformers keeps driving greedy and beam
search with the model's generation config; every token comes out of ONNX Runtime, and each new token costs one
decoder step."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from .. import transformers_compat
from ..transformers_compat import (
    BaseModelOutput,
    FilledCache,
    Seq2SeqLMOutput,
    SessionCache,
    cache_argument,
    cross_attention_layers,
    encoder_decoder_cache,
    given_cache,
    output_cache,
    self_attention_layers,
)
from .export import GraphSpec, evaluating
from .model import InferenceModel, exported_sessions
from .session import ONNXModel, summed_axis


GRAPHS = ("encoder", "cross_attention", "decoder", "decoder_with_past")
SELF_ATTENTION, CROSS_ATTENTION = ("key", "value"), ("cross_key", "cross_value")


def past_names(layers: int, prefix: str, kinds: tuple) -> list:
    """Graph input or output names of cached keys and values, e.g. `past.0.key`."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in kinds]


def pairs(tensors) -> list:
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
            self_attention, cross_attention = DynamicCache(), FilledCache(pairs(past))
        outputs = self.model(
            decoder_input_ids=decoder_input_ids,
            attention_mask=encoder_attention_mask,
            encoder_outputs=(encoder_hidden_states,),
            use_cache=True,
            return_dict=True,
            **cache_argument(encoder_decoder_cache(self_attention, cross_attention)),
        )
        present = [tensor for layer in self_attention_layers(output_cache(outputs)) for tensor in layer]
        return (outputs.logits, *present)


def _decoder_layers(model) -> int:
    config = model.config
    return getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or config.num_layers


def _graph_specs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The four graphs, each with sample inputs computed by the graphs before it."""
    layers = _decoder_layers(model)
    encoder, cross_attention = _Encoder(model), _CrossAttention(model)
    decoder, decoder_with_past = _Decoder(model, with_past=False), _Decoder(model, with_past=True)
    start = torch.full(
        (input_ids.shape[0], 2), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device
    )
    hidden = encoder(input_ids, attention_mask)
    cross = cross_attention(hidden)
    first = decoder(start, attention_mask, hidden, *cross)
    past = [tensor for self_kv, cross_kv in zip(pairs(first[1:]), pairs(cross)) for tensor in (*self_kv, *cross_kv)]

    sequence = {0: "batch", 1: "source"}
    decoder_inputs = ["decoder_input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    decoder_axes = {"encoder_attention_mask": sequence, "encoder_hidden_states": sequence}
    cross_past, cross_present = (past_names(layers, prefix, CROSS_ATTENTION) for prefix in ("past", "present"))
    self_past, self_present = (past_names(layers, prefix, SELF_ATTENTION) for prefix in ("past", "present"))

    def axes(names, length: str) -> dict:
        return {name: {0: "batch", 2: length} for name in names}

    return {
        "encoder": GraphSpec(
            encoder,
            (input_ids, attention_mask),
            ["input_ids", "attention_mask"],
            ["last_hidden_state"],
            {"input_ids": sequence, "attention_mask": sequence, "last_hidden_state": sequence},
        ),
        "cross_attention": GraphSpec(
            cross_attention,
            (hidden,),
            ["encoder_hidden_states"],
            cross_present,
            {"encoder_hidden_states": sequence} | axes(cross_present, "source"),
        ),
        "decoder": GraphSpec(
            decoder,
            (start, attention_mask, hidden, *cross),
            [*decoder_inputs, *cross_past],
            ["logits", *self_present],
            decoder_axes
            | {"decoder_input_ids": {0: "batch", 1: "target"}, "logits": {0: "batch", 1: "target"}}
            | axes(cross_past, "source")
            | axes(self_present, "target"),
        ),
        "decoder_with_past": GraphSpec(
            decoder_with_past,
            (start[:, :1], attention_mask, hidden, *past),
            [*decoder_inputs, *past_names(layers, "past", SELF_ATTENTION + CROSS_ATTENTION)],
            ["logits", *self_present],
            decoder_axes
            | {"decoder_input_ids": {0: "batch", 1: "step"}, "logits": {0: "batch", 1: "step"}}
            | axes(cross_past, "source")
            | axes(self_past, "past")
            | axes(self_present, summed_axis("past", "step")),
        ),
    }


def export_seq2seq(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, directory: Path) -> None:
    """Export the encoder, the cross-attention projections of its output, the first decoder step and the decoder
    step with past keys and values. In eval mode with eager attention (SDPA's masking shortcuts are decided in Python
    and would be traced as constants of the sample's shape); the model's own settings come back afterwards."""
    with transformers_compat.attention(model, "eager"), evaluating(model):
        for name, spec in _graph_specs(model, input_ids, attention_mask).items():
            spec.export(directory / f"{name}.onnx")


@dataclass
class _EncoderOutput(BaseModelOutput):
    """The encoder's output and, one row per sentence, the decoder's cross-attention keys and values."""

    cross_attention: tuple | None = None


class _EncoderInSession(torch.nn.Module):
    """What `model.get_encoder()` returns while ONNX Runtime generates."""

    def __init__(self, seq2seq: "Seq2SeqLM"):
        super().__init__()
        self.seq2seq = seq2seq

    def forward(self, input_ids=None, attention_mask=None, **unused):
        return self.seq2seq.encode(input_ids, attention_mask)


class Seq2SeqLM(InferenceModel):
    """The encoder and decoder sessions of an exported sequence-to-sequence model."""

    runs = "Evaluation and generation"
    can_quantize = True

    def __init__(
        self, encoder: ONNXModel, cross_attention: ONNXModel, decoder: ONNXModel, decoder_with_past: ONNXModel
    ):
        self.encoder, self.cross_attention, self.decoder, self.decoder_with_past = self.sessions = (
            encoder,
            cross_attention,
            decoder,
            decoder_with_past,
        )

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "is_encoder_decoder", False) and model.can_generate()

    @classmethod
    def load(
        cls, model, sample_inputs: dict, directory: Path, fp16: bool = False, quantize: bool = False
    ) -> "Seq2SeqLM":
        """The sessions of `model`, exported into `directory` from `sample_inputs` (reused while the weights and
        config are unchanged); fp16 when `fp16` and running on CUDA, inputs and outputs in their own types; in
        dynamic int8 when `quantize` and running on the CPU, with the fp32 sessions as `reference`."""
        directory = Path(directory)

        def export():
            export_seq2seq(model, sample_inputs["input_ids"], sample_inputs["attention_mask"], directory)

        sessions, int8 = exported_sessions(model, GRAPHS, directory, fp16, export, quantize)
        if not int8:
            return cls(*sessions)
        quantized = cls(*int8)
        quantized.reference = cls(*sessions)
        return quantized

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
            "decoder_input_ids": decoder_input_ids,
            "encoder_attention_mask": encoder_attention_mask,
            "encoder_hidden_states": encoder_outputs[0],
        }
        if cache is None or cache.get_seq_length() == 0:
            cross_attention = self._cross_attention_of(encoder_outputs)
            names = past_names(len(cross_attention) // 2, "past", CROSS_ATTENTION)
            logits, *present = self.decoder(inputs | dict(zip(names, cross_attention))).values()
            return logits, SessionCache(pairs(present), pairs(cross_attention))
        layers = [(*own, *cross) for own, cross in zip(self_attention_layers(cache), cross_attention_layers(cache))]
        names = past_names(len(layers), "past", SELF_ATTENTION + CROSS_ATTENTION)
        inputs |= dict(zip(names, (tensor for layer in layers for tensor in layer)))
        logits, *present = self.decoder_with_past(inputs).values()
        for layer, (key, value) in enumerate(pairs(present)):
            cache.self_attention_cache.update(key, value, layer)
        return logits, cache

    def forward(
        self,
        model,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        encoder_outputs=None,
        labels=None,
        **kwargs,
    ):
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits, cache = self.decode(decoder_input_ids, attention_mask, encoder_outputs, given_cache(kwargs))
        loss = (
            None if labels is None else transformers_compat.head_loss("ForConditionalGeneration", logits, labels, None)
        )
        return Seq2SeqLMOutput(
            loss=loss, logits=logits, encoder_last_hidden_state=encoder_outputs[0], **cache_argument(cache)
        )

    def replacements(self, model) -> dict:
        encoder = _EncoderInSession(self)
        return super().replacements(model) | {"get_encoder": lambda *args, **kwargs: encoder}
