"""Everything ort_trainer knows of transformers' internals, in one place.

The rest of the package imports only transformers' public top-level names and this module. Each item below says
which transformers versions it was checked on; where those versions differ, the difference is detected from the
installed transformers (a field, a signature), not from its version string. `TESTED_TRANSFORMERS` is the range the
test suite passed on: setup.py pins it, and a run outside it is warned about once.
"""

import contextlib
import functools
import importlib.metadata
import logging

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import AttentionInterface, AttentionMaskInterface, Cache, DynamicLayer, EncoderDecoderCache
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss, ForTokenClassification
from transformers.modeling_outputs import BaseModelOutput as BaseModelOutput
from transformers.modeling_outputs import CausalLMOutputWithPast as CausalLMOutputWithPast
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.modeling_outputs import SequenceClassifierOutput as SequenceClassifierOutput
from transformers.modeling_outputs import TokenClassifierOutput as TokenClassifierOutput
from transformers.trainer_utils import get_last_checkpoint as get_last_checkpoint


logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = ">=5.20,<5.26"


def untested_version_warning(version: str) -> str | None:
    """What to tell a user whose transformers `version` is outside the tested range, or None."""
    if Version(version) in SpecifierSet(TESTED_TRANSFORMERS):
        return None
    return (
        f"ort_trainer was tested with transformers{TESTED_TRANSFORMERS}; transformers {version} is installed. ONNX "
        "Runtime generation and training rely on transformers internals that may have changed: compare a short run "
        f"with `--use_ort False` before trusting results, or pip install 'transformers{TESTED_TRANSFORMERS}'."
    )


@functools.lru_cache(maxsize=None)
def warn_if_untested() -> None:
    """Warn once when the installed transformers is outside the tested range (a user may force any version)."""
    message = untested_version_warning(importlib.metadata.version("transformers"))
    if message:
        logger.warning(message)


# Attention implementation (checked on 5.20-5.25): `config._attn_implementation` holds the name the model runs,
# `set_attn_implementation` switches it (and may replace sub-configs).
def attention_implementation(model: torch.nn.Module) -> str:
    return model.config._attn_implementation


@contextlib.contextmanager
def attention(model: torch.nn.Module, implementation: str):
    """Run `model` with another attention implementation inside; its own comes back afterwards."""
    own = attention_implementation(model)
    if own != implementation:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if own != implementation:
            model.set_attn_implementation(own)


def register_attention(name: str, attention_function, mask_function) -> None:
    """Make `name` an attention implementation: `attention_function` computes it from the mask `mask_function`
    builds (the signatures of `eager_attention_forward` and `masking_utils.sdpa_mask`, 5.20-5.25)."""
    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, mask_function)


# The loss each head's forward computes from its logits (5.20-5.25): classifiers and causal LMs call these functions
# of transformers.loss.loss_utils; T5, BART and Marian compute cross-entropy over every target token themselves.
def head_loss(head: str, logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    if head == "ForTokenClassification":
        return ForTokenClassification(logits, labels, config)
    if head == "ForSequenceClassification":
        return ForSequenceClassificationLoss(labels, logits, config)
    if head == "ForCausalLM":
        return ForCausalLMLoss(logits, labels, vocab_size=config.vocab_size)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def settle_problem_type(model: torch.nn.Module, labels) -> None:
    """Sequence classifiers choose `config.problem_type` from the first labels they see (5.20-5.25: the rule of
    `ForSequenceClassificationLoss`, which their forwards repeat inline). Choosing it the same way before a compiled
    forward first runs keeps dynamo from tracing the model again when the attribute changes after that run."""
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", "") is not None or not torch.is_tensor(labels):
        return
    if type(model).__name__.endswith("ForSequenceClassification"):
        logits = torch.zeros(labels.shape[0], config.num_labels, device=labels.device)
        try:
            ForSequenceClassificationLoss(labels, logits, config)  # sets config.problem_type first
        except (RuntimeError, ValueError):
            pass  # labels the loss refuses: the training step reports them, as a data error


# The KV cache. transformers 5.24 renamed the cache argument of `forward` and the cache field of model outputs from
# `past_key_values` to `cache` (5.20-5.23: `past_key_values`; 5.24 still accepts the old argument, with a warning).
CACHE_NAME = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


def cache_argument(cache) -> dict:
    """`cache` as the keyword argument a model's `forward` takes it by."""
    return {CACHE_NAME: cache}


def output_cache(outputs):
    """The cache a model returned."""
    return outputs[CACHE_NAME] if CACHE_NAME in outputs else None


def given_cache(kwargs: dict):
    """The cache `generate` passed to `forward`, under whichever name this transformers uses."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


class FilledLayer(DynamicLayer):
    """A cache layer that starts with the given keys and values, held as they are: a `DynamicLayer` fills itself by
    concatenating onto an empty tensor, which an exported graph would keep as a copy of each at every step.
    (Layer fields `keys`, `values`, `is_initialized`, `dtype`, `device`: 5.20-5.25.)"""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys, values


class ReplacingLayer(FilledLayer):
    """A cache layer that each update replaces with the keys and values given, past ones included (what a decoder
    session returns), where PyTorch's layer would concatenate a copy."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return self.keys, self.values


class FilledCache(Cache):
    """Keys and values of every decoder layer, one (key, value) pair a layer, in layers of `layer_class`."""

    def __init__(self, keys_and_values: list, layer_class=FilledLayer):
        super().__init__(layers=[layer_class(key, value) for key, value in keys_and_values])


def session_cache(keys_and_values: list) -> Cache:
    """A decoder session's keys and values, for `generate` to carry between steps (and reorder, for beam search)."""
    return FilledCache(keys_and_values, ReplacingLayer)


def encoder_decoder_cache(self_attention: Cache, cross_attention: Cache) -> EncoderDecoderCache:
    return EncoderDecoderCache(self_attention, cross_attention)


class SessionCache(EncoderDecoderCache):
    """The decoder sessions' keys and values, for `generate` to carry between steps (each update replaces a layer's
    keys and values). Beam search reorders the cache through `reorder_cache` (5.20-5.25) only among the beams of one
    sentence, whose cross-attention keys and values are equal copies of one encoder output: only the self-attention
    part needs reordering."""

    def __init__(self, self_attention: list, cross_attention: list):
        super().__init__(session_cache(self_attention), session_cache(cross_attention))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.self_attention_cache.reorder_cache(beam_idx)


def self_attention_layers(cache: Cache) -> list:
    """(key, value) of each layer's self-attention, from an `EncoderDecoderCache` or a decoder-only cache."""
    cache = getattr(cache, "self_attention_cache", cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def cross_attention_layers(cache: EncoderDecoderCache) -> list:
    """(key, value) of each layer's cross-attention."""
    return [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
