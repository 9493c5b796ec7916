"""`ORTTrainer` and `Seq2SeqORTTrainer`: the `transformers` trainers, training through ONNX Runtime's ORTModule.

Only hooks are overridden, each around a `super()` call (written against transformers 5.23):
- `_wrap_model` puts the model in an ORTModule for training and lets accelerate wrap that (DDP outside ORT);
- `get_optimizer_cls_and_kwargs` adds ORT's FusedAdam;
- `compute_loss` runs the loss inside the ORT graph with `--use_module_with_loss`;
- `training_step` drops all-padding columns, and on the first step reports which backend really ran (or why
  ORT could not, then fails or falls back to PyTorch);
- `train` and `_save` switch the model to what ORT can differentiate for training and back;
- `evaluation_loop` and `prediction_step` run `--inference_with_ort` in an InferenceSession; for
  sequence-to-sequence models `Seq2SeqTrainer`'s generation runs with ONNX Runtime sessions in place of the model.
`self.model` stays the plain model, so checkpoints are ordinary Hugging Face checkpoints.
"""

import contextlib
import inspect
import logging
import os
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer, TrainingArguments

from . import inference, ortmodule, transformers_compat
from .import_utils import onnxruntime_providers
from .padding import trim_padding
from .training_args import ORT_FUSED_ADAM, ORTSeq2SeqTrainingArguments, ORTTrainingArguments

logger = logging.getLogger(__name__)


class _ModelWithLoss(torch.nn.Module):
    """The model and the trainer's loss in one module, so that ORT exports and differentiates both."""

    def __init__(self, model: torch.nn.Module, compute_loss):
        super().__init__()
        self.model = model
        self._compute_loss = compute_loss

    def forward(self, inputs: dict, num_items_in_batch=None):
        return self._compute_loss(self.model, inputs, num_items_in_batch=num_items_in_batch)


def _configs_with_cache(model: torch.nn.Module) -> list:
    """Every distinct config in the model that has `use_cache`: submodules such as T5's decoder hold copies."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is not None:
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def _use_cache(configs: list, values: list):
    saved = [config.use_cache for config in configs]
    for config, value in zip(configs, values):
        config.use_cache = value
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config.use_cache = value


@contextlib.contextmanager
def _prepared_for_ort_training(model: torch.nn.Module):
    """Eager attention (ORT cannot differentiate SDPA with dropout) and no KV cache (ORT cannot return cache
    objects) while training; the model's own settings come back afterwards. Yields the settings to save."""
    if not isinstance(model, PreTrainedModel):
        yield contextlib.nullcontext
        return
    with transformers_compat.attention(model, "eager"):  # may replace config objects: collect them after
        configs = _configs_with_cache(model)
        user_values = [config.use_cache for config in configs]
        with _use_cache(configs, [False] * len(configs)):
            yield lambda: _use_cache(configs, user_values)


def _as_ort_arguments(args: TrainingArguments | None, args_class: type) -> TrainingArguments:
    """Accept a plain `TrainingArguments` (ORT options at their defaults), as `TRL` trainers accept theirs."""
    if args is None or isinstance(args, args_class):
        return args
    values = {key: value for key, value in args.to_dict().items() if not key.startswith("_")}
    values["hub_token"] = args.hub_token
    return args_class(**values)


# What `evaluation_loop` reports besides the loss and `compute_metrics`' metrics.
_LOOP_TIMINGS = ("model_preparation_time",)


def _quantization_metrics(int8, fp32, prefix: str) -> dict:
    """The share of the int8 graph's predictions that equal the fp32 graph's, and the fp32 graph's metrics."""
    int8_logits, fp32_logits = (
        output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions for output in (int8, fp32)
    )
    metrics = {f"{prefix}_int8_agreement": inference.agreement(int8_logits, fp32_logits, int8.label_ids)}
    for key, value in fp32.metrics.items():
        name = key.removeprefix(f"{prefix}_")
        if name not in _LOOP_TIMINGS:
            metrics[f"{prefix}_fp32_{name}"] = value
    return metrics


class ORTTrainer(Trainer):
    """A `transformers.Trainer` whose training forward and backward run in ONNX Runtime.

    Takes the same arguments as `Trainer`; `args` may be an `ORTTrainingArguments` or a plain `TrainingArguments`.
    Evaluation and prediction run as in `Trainer`, or with `inference_with_ort` in an ONNX Runtime session.

    Example:
        ```python
        from ort_trainer import ORTTrainer, ORTTrainingArguments

        args = ORTTrainingArguments(output_dir="out", ort_fallback="error")
        trainer = ORTTrainer(model=model, args=args, train_dataset=train_dataset)
        trainer.train()
        ```
    """

    _args_class = ORTTrainingArguments

    def __init__(self, model=None, args=None, *positional, **kwargs):
        transformers_compat.warn_if_untested()
        if args is None:
            args = self._args_class(output_dir="trainer_output")
        super().__init__(model, _as_ort_arguments(args, self._args_class), *positional, **kwargs)
        self._user_settings = contextlib.nullcontext  # restores the user's model settings while saving
        self._backend_reported = False
        self._pytorch_fallback = None  # the model trained in PyTorch after ORT failed, with `--ort_fallback pytorch`
        self._fallback_reason = ""
        self._inference_model, self._inference_weights = None, None  # `--inference_with_ort`'s, for these weights
        self._running_in = None  # the sessions the model computes in, inside an evaluation loop

    def train(self, *args, **kwargs):
        if not self.args.use_ort:
            return super().train(*args, **kwargs)
        self._backend_reported, self._pytorch_fallback = False, None
        with _prepared_for_ort_training(self.model) as user_settings:
            self._user_settings = user_settings
            try:
                return super().train(*args, **kwargs)
            finally:
                self._user_settings = contextlib.nullcontext

    def _wrap_model(self, model, training=True, dataloader=None):
        if not (training and self.args.use_ort):
            return super()._wrap_model(model, training, dataloader)
        if ortmodule.is_ortmodule(self.accelerator.unwrap_model(model)):
            return model
        to_wrap = _ModelWithLoss(self.model, super().compute_loss) if self.args.use_module_with_loss else self.model
        ort_model = ortmodule.wrap_with_ortmodule(to_wrap, self._ortmodule_options())
        # accelerate places the ORTModule, wraps it in DDP under torchrun and applies autocast. Returning a
        # model other than `self.model` tells `Trainer` that only the optimizer is left to prepare.
        return self.accelerator.prepare_model(ort_model)

    def _ortmodule_options(self) -> ortmodule.ORTModuleOptions:
        prefix = self.args.onnx_prefix or type(self.model).__name__
        return ortmodule.ORTModuleOptions(
            memory_optimization_level=self.args.ort_memory_optimization_level,
            sparsity_optimization=self.args.ort_sparsity_optimization,
            log_level=self.args.ort_log_level,
            save_onnx=self.args.save_onnx,
            onnx_prefix=f"{prefix}_rank{self.args.process_index}" if self.args.world_size > 1 else prefix,
            save_onnx_path=os.path.join(self.args.output_dir, "onnx") if self.args.save_onnx else "",
        )

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        if args.optim != ORT_FUSED_ADAM:
            return Trainer.get_optimizer_cls_and_kwargs(args, model)
        return ortmodule.fused_adam_class(), {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.use_ort and self.args.use_module_with_loss and model is self.model_wrapped and not return_outputs:
            return model(inputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._pytorch_fallback is not None:
            model = self._pytorch_fallback  # the training loop still holds the ORTModule it was given
        elif self.args.use_ort and self._can_trim_padding():
            # Encoder-decoder labels are target tokens, not aligned with the input: never trimmed.
            inputs = trim_padding(inputs, labels_too=not self.model.config.is_encoder_decoder)
        if self._backend_reported:
            return super().training_step(model, inputs, num_items_in_batch)
        # The first step exports and builds the ORT graph: say plainly what failed, and which backend runs.
        start = time.perf_counter()
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except Exception as error:
            unwrapped = self.accelerator.unwrap_model(model)
            if not ortmodule.is_ortmodule(unwrapped):
                raise
            reason = ortmodule.describe_failure(unwrapped, error)
            if self.args.ort_fallback == "error":
                raise ortmodule.ORTTrainingError(
                    f"{reason} To fix: pass `--ort_fallback pytorch` to train in PyTorch when ORT cannot, "
                    "or `--use_ort False`."
                ) from error
            model = self._fall_back_to_pytorch(reason)
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._report_backend(model, time.perf_counter() - start)
        return loss

    def _fall_back_to_pytorch(self, reason: str):
        logger.warning("%s Training continues in PyTorch (`--ort_fallback pytorch`).", reason)
        self._fallback_reason = reason
        self._pytorch_fallback = self.model_wrapped = self.accelerator.prepare_model(self.model)
        return self._pytorch_fallback

    def _report_backend(self, model, first_step_seconds: float):
        self._backend_reported = True
        device = self.args.device
        if not self.args.use_ort:
            logger.info("Training backend: PyTorch on %s (`--use_ort False`).", device)
        elif self._pytorch_fallback is not None:
            logger.warning("Training backend: PyTorch on %s, not ONNX Runtime. %s", device, self._fallback_reason)
        else:
            status = ortmodule.ortmodule_status(self.accelerator.unwrap_model(model))
            logger.info("Training backend: %s on %s.", status.backend, device)
            if device.type == "cpu":
                logger.info(
                    "On CPU, ONNX Runtime trains a BERT-base about 0.9x as fast as PyTorch on the same tokens; its "
                    "gain comes from `--ort_trim_padding` on padded batches (see docs/benchmarks.md)."
                )
        # The first step includes ORT's export and graph build: recorded apart, for benchmarks.
        self.log({"first_step_seconds": round(first_step_seconds, 3)})

    def _inference_in_ort(self) -> bool:
        """`--inference_with_ort`, for the heads it covers, unless the model is on a GPU this ONNX Runtime cannot
        use and `--ort_inference_without_cuda pytorch` asks for PyTorch then."""
        if not self.args.inference_with_ort:
            return False
        if not inference.supports(self.model):
            logger.warning(
                "Evaluation backend: PyTorch on %s. `--inference_with_ort` runs sequence and token classifiers, "
                "encoder-decoder and decoder-only language models; %s is none of these.",
                self.args.device, type(self.model).__name__,
            )
            return False
        available = onnxruntime_providers()
        return inference.select_provider(self.args.device, available, self.args.ort_inference_without_cuda) is not None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        if not self._inference_in_ort():
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        start = time.perf_counter()
        self._inference_model = self._load_inference_model(dataloader)
        setup_seconds = time.perf_counter() - start
        # Quantized sessions are measured against their fp32 graph on the same data, through the same loop.
        reference = self._inference_model.reference if self.args.ort_quantization_check else None
        loop_args = (dataloader, description, prediction_loss_only and reference is None, ignore_keys, metric_key_prefix)
        output = self._evaluation_loop_in(self._inference_model, *loop_args)
        if reference is not None:
            fp32 = self._evaluation_loop_in(reference, *loop_args)
            output.metrics.update(_quantization_metrics(output, fp32, metric_key_prefix))
        # Export and session creation (or reuse) are part of the runtime; recorded apart, for benchmarks.
        output.metrics[f"{metric_key_prefix}_ort_setup_seconds"] = round(setup_seconds, 3)
        return output

    def _evaluation_loop_in(self, inference_model: inference.InferenceModel, *loop_args):
        self._running_in = inference_model
        try:
            return super().evaluation_loop(*loop_args)
        finally:
            self._running_in = None

    def _load_inference_model(self, dataloader) -> inference.InferenceModel:
        # Parameters change in place, which bumps their version counters: equal counters, same weights.
        weights = tuple((tensor.data_ptr(), tensor._version) for tensor in self.model.state_dict().values())
        if self._inference_model is not None and weights == self._inference_weights:
            return self._inference_model
        self._inference_weights = weights
        sample = self._inference_inputs(self._prepare_inputs(next(iter(dataloader))))
        directory = Path(self.args.output_dir) / "onnx"
        # One rank exports (or reuses a current export); the others then load what it wrote. One per machine
        # when machines do not share the output folder (`--save_on_each_node`).
        with self.args.main_process_first(local=self.args.save_on_each_node, desc="ONNX export"):
            inference_model = inference.load_for_inference(
                self.model, sample, directory, fp16=self.args.fp16, trim_padding=self._can_trim_padding(),
                quantize=self.args.ort_quantization == "dynamic_int8",
            )
        logger.info(inference_model.description())
        return inference_model

    def _can_trim_padding(self) -> bool:
        """Only transformers models that mask padding out of attention give equal results on trimmed batches."""
        return (
            self.args.ort_trim_padding
            and isinstance(self.model, PreTrainedModel)
            and "attention_mask" in self._forward_parameters()
        )

    def _forward_parameters(self) -> list:
        return list(inspect.signature(self.model.forward).parameters)

    def _inference_inputs(self, inputs: dict) -> dict:
        accepted = self._forward_parameters()
        model_inputs = {
            name: value for name, value in inputs.items()
            if name in accepted and name not in self.label_names and torch.is_tensor(value)
        }
        return trim_padding(model_inputs) if self._can_trim_padding() else model_inputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if self._running_in is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        # The Trainer computes losses, label smoothing, `compute_loss_func` and generation as always; the model's
        # forward (and generation steps) compute in ONNX Runtime meanwhile.
        with self._running_in.running(self.model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)

    def _save(self, output_dir=None, state_dict=None):
        with self._user_settings():
            super()._save(output_dir, state_dict)


class Seq2SeqORTTrainer(ORTTrainer, Seq2SeqTrainer):
    """A `Seq2SeqTrainer` whose training runs in ONNX Runtime, as `ORTTrainer`'s does; with `inference_with_ort`,
    `predict_with_generate` generates in ONNX Runtime sessions (encoder, cross-attention, decoder, decoder with past)."""

    _args_class = ORTSeq2SeqTrainingArguments


# The name Optimum used, for users moving over.
ORTSeq2SeqTrainer = Seq2SeqORTTrainer
