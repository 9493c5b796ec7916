"""The tokens a trainer's batches hold and the tokens its model computes, so that throughputs can be compared on the
same tokens: trimming padding or not changes the second, never the first."""

import torch
from transformers import Trainer


class TokenCountingMixin(Trainer):
    """Counts, in each training and evaluation batch that reaches the model, the real tokens (its attention mask)
    and the tokens computed (its input ids, after any trimming). `train()` and evaluation report them per sample, as
    `train_real_tokens_per_sample` and `train_computed_tokens_per_sample` (`eval_...` likewise)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token_counts = {}  # split -> [samples, computed tokens, real tokens]

    def _count_tokens(self, split: str, inputs: dict) -> None:
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if not torch.is_tensor(ids) or ids.dim() != 2:
            return
        counts = self._token_counts.setdefault(split, [0, 0, 0])
        counts[0] += ids.shape[0]
        counts[1] += ids.numel()
        counts[2] = counts[2] + (mask.sum() if torch.is_tensor(mask) else ids.numel())  # stays on the device

    def _tokens_per_sample(self, split: str, prefix: str) -> dict:
        samples, computed, real = self._token_counts.pop(split, (0, 0, 0))
        if not samples:
            return {}
        return {
            f"{prefix}_real_tokens_per_sample": round(float(real) / samples, 2),
            f"{prefix}_computed_tokens_per_sample": round(computed / samples, 2),
        }

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._count_tokens("train", inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        self._count_tokens("eval", inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)

    def train(self, *args, **kwargs):
        self._token_counts.pop("train", None)
        output = super().train(*args, **kwargs)
        output.metrics.update(self._tokens_per_sample("train", "train"))
        return output

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._token_counts.pop("eval", None)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._tokens_per_sample("eval", metric_key_prefix))
        return output
