"""Decoder-only language models (GPT-2 and the like) in ONNX Runtime: a session for the first step over the prompt
and one for each later step with the past keys and values, put in place of the model's forward. The Trainer's
evaluation loss and transformers' `generate` (greedy and beam search) then compute in them."""

from pathlib import Path

import torch
from transformers import DynamicCache

from .. import transformers_compat
from ..transformers_compat import (
    CausalLMOutputWithPast,
    FilledCache,
    cache_argument,
    given_cache,
    output_cache,
    self_attention_layers,
    session_cache,
)
from .export import GraphSpec, evaluating
from .model import InferenceModel, exported_sessions
from .seq2seq import SELF_ATTENTION, pairs, past_names
from .session import ONNXModel, summed_axis


GRAPHS = ("decoder", "decoder_with_past")


class _Decoder(torch.nn.Module):
    """The model, returning the logits and every layer's keys and values (past ones included)."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = FilledCache(pairs(past)) if self.with_past else DynamicCache()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **cache_argument(cache),
        )
        return (
            outputs.logits,
            *(tensor for layer in self_attention_layers(output_cache(outputs)) for tensor in layer),
        )


def _positions(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The positions of the last `length` tokens: their index among the real tokens, as `generate` computes them
    for left-padded prompts (and plain 0, 1, 2, ... for unpadded rows)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def export_causal_lm(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, directory: Path) -> None:
    """Export the first step and the step with past keys and values, in eval mode with eager attention."""
    layers = model.config.num_hidden_layers
    decoder, decoder_with_past = _Decoder(model, with_past=False), _Decoder(model, with_past=True)
    self_past, self_present = (past_names(layers, prefix, SELF_ATTENTION) for prefix in ("past", "present"))
    step_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)

    def axes(names, length: str) -> dict:
        return {name: {0: "batch", 2: length} for name in names}

    with transformers_compat.attention(model, "eager"), evaluating(model):
        _, *present = decoder(input_ids, attention_mask, _positions(attention_mask, input_ids.shape[1]))
        inputs = ["input_ids", "attention_mask", "position_ids"]
        specs = {
            "decoder": GraphSpec(
                decoder,
                (input_ids, attention_mask, _positions(attention_mask, input_ids.shape[1])),
                inputs,
                ["logits", *self_present],
                {
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "position_ids": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch", 1: "sequence"},
                }
                | axes(self_present, "sequence"),
            ),
            "decoder_with_past": GraphSpec(
                decoder_with_past,
                (input_ids[:, :1], step_mask, _positions(step_mask, 1), *present),
                [*inputs, *self_past],
                ["logits", *self_present],
                {
                    "input_ids": {0: "batch", 1: "step"},
                    "attention_mask": {0: "batch", 1: summed_axis("past", "step")},
                    "position_ids": {0: "batch", 1: "step"},
                    "logits": {0: "batch", 1: "step"},
                }
                | axes(self_past, "past")
                | axes(self_present, summed_axis("past", "step")),
            ),
        }
        for name, spec in specs.items():
            spec.export(directory / f"{name}.onnx")


class CausalLM(InferenceModel):
    """The sessions of an exported decoder-only language model."""

    runs = "Evaluation and generation"

    def __init__(self, decoder: ONNXModel, decoder_with_past: ONNXModel):
        self.decoder, self.decoder_with_past = self.sessions = (decoder, decoder_with_past)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (
            config is not None
            and not config.is_encoder_decoder
            and model.can_generate()
            and any(cls.__name__.endswith(("LMHeadModel", "ForCausalLM")) for cls in type(model).__mro__)
        )

    @classmethod
    def load(cls, model, sample_inputs: dict, directory: Path, fp16: bool = False) -> "CausalLM":
        """The sessions of `model`, exported into `directory` from `sample_inputs` (reused while the weights and
        config are unchanged); fp16 when `fp16` and running on CUDA, inputs and outputs in their own types."""
        directory = Path(directory)
        input_ids = sample_inputs["input_ids"]
        attention_mask = sample_inputs.get("attention_mask", torch.ones_like(input_ids))

        def export():
            export_causal_lm(model, input_ids, attention_mask, directory)

        sessions, _ = exported_sessions(model, GRAPHS, directory, fp16, export)
        return cls(*sessions)

    def forward(
        self, model, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None, **kwargs
    ):
        cache = given_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(
                input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long, device=input_ids.device
            )
        if position_ids is None:  # as the model numbers them: on from the past
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if past == 0:
            logits, *present = self.decoder(inputs).values()
            cache = session_cache(pairs(present))
        else:
            names = past_names(len(cache.layers), "past", SELF_ATTENTION)
            keys_and_values = (tensor for layer in self_attention_layers(cache) for tensor in layer)
            logits, *present = self.decoder_with_past(inputs | dict(zip(names, keys_and_values))).values()
            for layer, (key, value) in enumerate(pairs(present)):
                cache.update(key, value, layer)
        loss = None if labels is None else transformers_compat.head_loss("ForCausalLM", logits, labels, model.config)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_argument(cache if use_cache else None))
