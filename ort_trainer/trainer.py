"""`ORTTrainer` and `Seq2SeqORTTrainer`: the `transformers` trainers, training in ONNX Runtime through ORTModule
or through the compile backend (`compile_backend.py`), as `--ort_backend` chooses.

Only hooks are overridden, each around a `super()` call (checked on transformers 5.20 to 5.25):
- `_wrap_model` puts the model in an ORTModule, or compiles it with the compile backend, for training and lets
  accelerate wrap that (DDP outside ORT);
- `get_optimizer_cls_and_kwargs` adds ORT's FusedAdam;
- `compute_loss` runs the loss inside the ORT graph with `--use_module_with_loss`;
- `get_train_dataloader`, `get_eval_dataloader` and `get_test_dataloader` have the collator refuse bad batches as
  data errors and drop all-padding columns with `--trim_padding` whatever the backend, on the host (`collation.py`);
- `training_step` adds the attention mask a model takes by default (and for the compile backend pads lengths up to
  a few buckets, one graph each), and on the first step reports which backend really ran (or why ORT could not,
  then fails or falls back to PyTorch);
- `train` and `_save` switch the model to what ORT can differentiate for training and back; `train` adds the
  first step's time (ORT's export and graph build) to its metrics as `train_first_step_seconds`;
- `evaluation_loop` loads `--inference_with_ort`'s sessions (`inference/`), and `prediction_step` runs the
  Trainer's own prediction step with the model's forward (and generation steps) in them;
- `TokenCountingMixin` (`token_counts.py`) reports the real and computed tokens per sample.
`self.model` stays the plain model, so checkpoints are ordinary Hugging Face checkpoints.
"""

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import os
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer, TrainingArguments

from . import inference, ortmodule, transformers_compat
from .collation import CheckingCollator, TrainingDataError, batch_limits, check_batch
from .import_utils import onnxruntime_providers
from .padding import trim_padding
from .token_counts import TokenCountingMixin
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
def _prepared_for_ort_training(model: torch.nn.Module, backend: str):
    """Attention that `backend` can train, and no KV cache (ORT cannot return cache objects), while training; the
    model's own settings come back afterwards. Yields the settings to save. The compile backend keeps SDPA, whose
    math it runs in the inputs' precision; anything else trains with eager attention (ORTModule cannot
    differentiate SDPA with dropout)."""
    if not isinstance(model, PreTrainedModel):
        yield contextlib.nullcontext
        return
    keeps_sdpa = backend == "compile" and transformers_compat.attention_implementation(model) == "sdpa"
    attention = "sdpa" if keeps_sdpa else "eager"
    with transformers_compat.attention(model, attention):  # may replace config objects: collect them after
        configs = _configs_with_cache(model)
        user_values = [config.use_cache for config in configs]
        with _use_cache(configs, [False] * len(configs)):
            yield lambda: _use_cache(configs, user_values)


# The compile backend builds one graph per batch shape: trimmed lengths are rounded up to a multiple of this.
COMPILE_LENGTH_MULTIPLE = 32
# Past this many graphs for one model, the shapes change without bound: dynamo then raises, instead of silently
# running the model in PyTorch.
COMPILE_MAX_GRAPHS = 64


def pad_to_multiple(inputs: dict, multiple: int, pad_token_id: int, max_length: int | None, labels_too: bool) -> dict:
    """Pad the sequence columns at the end up to a multiple of `multiple` (at most `max_length`), so that batches
    trimmed to any length share a few shapes. The new columns are masked out of attention, and labels there are
    ignored, so results stay equal. Inputs with explicit `position_ids` are left as they are."""
    mask = inputs.get("attention_mask")
    if not torch.is_tensor(mask) or mask.dim() != 2 or "position_ids" in inputs:
        return inputs
    width = mask.shape[1]
    target = -(-width // multiple) * multiple
    if max_length is not None:
        target = max(width, min(target, max_length))
    if target == width:
        return inputs
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    if labels_too:
        fill["labels"] = -100
    return {
        name: torch.nn.functional.pad(value, (0, target - width), value=fill[name])
        if name in fill and torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == width
        else value
        for name, value in inputs.items()
    }


def _as_ort_arguments(args: TrainingArguments | None, args_class: type) -> TrainingArguments:
    """Accept any `TrainingArguments`, also a subclass with fields of its own (as TRL's configs are): a copy of the
    same object, in a class that adds the ONNX Runtime options at their defaults. Not rebuilt from `to_dict()`,
    which would drop the subclass's fields and run `__post_init__` on values it already processed."""
    if args is None or isinstance(args, args_class):
        return args
    ort_class = args_class if issubclass(args_class, type(args)) else _with_ort_options(type(args), args_class)
    ort_args = copy.copy(args)
    ort_args.__class__ = ort_class
    for option in dataclasses.fields(ort_class):
        if option.name not in vars(ort_args):
            default = option.default_factory() if option.default_factory is not dataclasses.MISSING else option.default
            setattr(ort_args, option.name, default)
    ort_args._check_ort_options()
    return ort_args


@functools.lru_cache
def _with_ort_options(user_class: type, args_class: type) -> type:
    """A dataclass with the fields of `user_class` and of `args_class`; it pickles (as `Trainer` saves its
    arguments in checkpoints) through `_new_arguments`, since a class made at run time has no import path."""
    namespace = {"__reduce__": lambda self: (_new_arguments, (user_class, args_class), vars(self).copy())}
    return dataclasses.dataclass(type(user_class.__name__, (args_class, user_class), namespace))


def _new_arguments(user_class: type, args_class: type):
    ort_class = _with_ort_options(user_class, args_class)
    return ort_class.__new__(ort_class)


# The device's own errors (a CUDA error), which say nothing of the data; torch raises them as such since 2.8.
DEVICE_ERRORS = (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()


# What `evaluation_loop` reports besides the loss and `compute_metrics`' metrics.
_LOOP_TIMINGS = ("model_preparation_time",)


def _quantization_metrics(int8, fp32, prefix: str, pad_token_id: int) -> dict:
    """The share of the int8 graph's predictions (or generated sentences) that equal the fp32 graph's, and the fp32
    graph's metrics."""
    int8_predictions, fp32_predictions = (
        output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        for output in (int8, fp32)
    )
    agreement = inference.agreement(int8_predictions, fp32_predictions, int8.label_ids, pad_token_id)
    metrics = {f"{prefix}_int8_agreement": agreement}
    for key, value in fp32.metrics.items():
        name = key.removeprefix(f"{prefix}_")
        if name not in _LOOP_TIMINGS:
            metrics[f"{prefix}_fp32_{name}"] = value
    return metrics


class ORTTrainer(TokenCountingMixin, Trainer):
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
        self._first_step_seconds = None
        self._backend, self._backend_reason = "", ""  # `ortmodule` or `compile`, and why
        self._inference_model, self._inference_weights = None, None  # `--inference_with_ort`'s, for these weights
        self._running_in = None  # the sessions the model computes in, inside an evaluation loop
        self._flops_by_shape = {}  # `floating_point_ops` of a batch, by the shape of its main input
        # Whether the batches come from the data loaders of `get_*_dataloader`, checked and trimmed by their collator.
        self._train_batches_prepared = self._eval_batches_prepared = False

    def train(self, *args, **kwargs):
        self._backend_reported, self._pytorch_fallback, self._first_step_seconds = False, None, None
        self._flops_by_shape = {}
        if self.args.use_ort:
            self._backend, self._backend_reason = self.args.training_backend()
            if self._backend == "compile":
                from . import compile_backend

                compile_backend.seed_random_generators(self.args.seed)
            with _prepared_for_ort_training(self.model, self._backend) as user_settings, self._graph_limits():
                self._user_settings = user_settings
                try:
                    output = super().train(*args, **kwargs)
                finally:
                    self._user_settings = contextlib.nullcontext
            if self._backend == "compile" and self._pytorch_fallback is None:
                stats = self._compile_stats()
                logger.info(
                    "Compile backend: %d graphs for this model (%d exported in %.1f s, %d read from the cache).",
                    stats.graphs_built,
                    stats.graphs_exported,
                    stats.export_seconds,
                    stats.graphs_from_cache,
                )
                output.metrics.update(ort_graphs=stats.graphs_built, ort_export_seconds=round(stats.export_seconds, 3))
        else:
            output = super().train(*args, **kwargs)
        # The first step includes ORT's export and graph build: reported apart, for benchmarks, with the train
        # metrics (not in the log history, which holds only what `Trainer` logs).
        if self._first_step_seconds is not None:
            output.metrics["train_first_step_seconds"] = round(self._first_step_seconds, 3)
        return output

    def floating_point_ops(self, inputs: dict) -> int:
        """The Trainer's count, made once per shape of the batch's main input: it walks every module of the model to
        count its parameters, at each step, which costs a large model milliseconds of host time while the GPU
        waits."""
        main_input = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        shape = tuple(main_input.shape) if torch.is_tensor(main_input) else None
        if shape not in self._flops_by_shape:
            self._flops_by_shape[shape] = super().floating_point_ops(inputs)
        return self._flops_by_shape[shape]

    def get_train_dataloader(self):
        self._train_batches_prepared = True
        with self._collating_on_host(check=self.args.use_ort):
            return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        self._eval_batches_prepared = True
        with self._collating_on_host():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        self._eval_batches_prepared = True
        with self._collating_on_host():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _collating_on_host(self, check: bool = False):
        """While the Trainer builds a data loader, a collator that also checks (`check`) and trims (`--trim_padding`)
        each batch it makes, on the host, before the batch moves to the device (`collation.py`)."""
        collator, trim = self.data_collator, self._can_trim_padding()
        self.data_collator = CheckingCollator(
            collator,
            limits=batch_limits(self.model) if check else None,
            trim=trim,
            trim_labels=trim and self._labels_follow_inputs(),
        )
        try:
            yield
        finally:
            self.data_collator = collator

    def _graph_limits(self):
        if self._backend != "compile":
            return contextlib.nullcontext()
        from . import compile_backend

        self._compile_stats_at_start = dataclasses.replace(compile_backend.stats)
        return compile_backend.graph_limits(COMPILE_MAX_GRAPHS)

    def _compile_stats(self):
        """What the compile backend did since this `train` call began."""
        from . import compile_backend

        now, start = compile_backend.stats, self._compile_stats_at_start
        names = [field.name for field in dataclasses.fields(now)]
        return dataclasses.replace(now, **{name: getattr(now, name) - getattr(start, name) for name in names})

    def _is_ort_model(self, model) -> bool:
        if self._backend == "compile":
            from . import compile_backend

            return compile_backend.is_compiled(model)
        return ortmodule.is_ortmodule(model)

    def _wrap_model(self, model, training=True, dataloader=None):
        if not (training and self.args.use_ort):
            return super()._wrap_model(model, training, dataloader)
        if self._is_ort_model(self.accelerator.unwrap_model(model)):
            return model
        to_wrap = _ModelWithLoss(self.model, super().compute_loss) if self.args.use_module_with_loss else self.model
        if self._backend == "compile":
            from . import compile_backend

            ort_model = compile_backend.compile_model(to_wrap, cuda_graphs=self.args.ort_cuda_graphs)
        else:
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
        batch = inputs  # as the data loader gave it
        if self._pytorch_fallback is not None:
            model = self._pytorch_fallback  # the training loop still holds the ORTModule it was given
        elif self.args.use_ort:
            inputs = self._ort_training_inputs(inputs)
        if not self._train_batches_prepared:
            inputs = self._trimmed(inputs)
        if (
            self.args.use_ort
            and self._backend == "compile"
            and self._pytorch_fallback is None
            and self._can_trim_padding()
        ):
            inputs = self._pad_to_bucket(inputs)
        if self._backend_reported:
            return super().training_step(model, inputs, num_items_in_batch)
        # The first step exports and builds the ORT graph: say plainly what failed, and which backend runs.
        start = time.perf_counter()
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except Exception as error:
            unwrapped = self.accelerator.unwrap_model(model)
            if not self._is_ort_model(unwrapped):
                raise
            reason = self._describe_failure(unwrapped, error)
            self._raise_if_fails_in_pytorch(batch, num_items_in_batch, reason)
            if self.args.ort_fallback == "error":
                raise ortmodule.ORTTrainingError(
                    f"{reason} To fix: pass `--ort_fallback pytorch` to train in PyTorch when ORT cannot, "
                    "or `--use_ort False`."
                ) from error
            model = self._fall_back_to_pytorch(reason)
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._first_step_seconds = time.perf_counter() - start
        self._report_backend(model)
        return loss

    def _ort_training_inputs(self, inputs: dict) -> dict:
        """The batch ORT trains on: checked first (unless its collator checked it), the model's problem type settled
        before a compiled forward sees it change; with an all-ones attention mask where a transformers model takes
        one and the batch has none (the model's own default, but built by mask code ORT cannot export, such as
        GPT-2's `aten::diff`)."""
        if not self._train_batches_prepared and (limits := batch_limits(self.model)) is not None:
            check_batch(inputs, limits)
        transformers_compat.settle_problem_type(self.model, inputs.get("labels"))
        ids = inputs.get("input_ids")
        if self._takes_attention_mask() and torch.is_tensor(ids) and inputs.get("attention_mask") is None:
            inputs = {**inputs, "attention_mask": torch.ones_like(ids)}
        return inputs

    def _raise_if_fails_in_pytorch(self, inputs: dict, num_items_in_batch, ort_failure: str) -> None:
        """ORT's export runs the model in PyTorch, so bad data fails there first and looks like an ORT failure.
        The batch, as the data loader gave it, runs once more in plain PyTorch (no gradients, random state kept):
        if it fails there too, the data is at fault, and `--ort_fallback pytorch` could not help. Unless the device
        itself failed: an ONNX Runtime failure on CUDA (a CUDA graph it could not capture) can leave the device in
        an error state that PyTorch meets next, and that says nothing of the data."""
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                self.compute_loss(self.model, self._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch)
        except Exception as error:
            if isinstance(error, DEVICE_ERRORS):
                fix = "train without `--ort_cuda_graphs`" if self.args.ort_cuda_graphs else "`--use_ort False`"
                raise ortmodule.ORTTrainingError(
                    f"{ort_failure} PyTorch then failed on the device too ({str(error).splitlines()[0]}), so "
                    f"it cannot take over in this process. To fix: {fix}."
                ) from error
            raise TrainingDataError(
                f"The training batch fails in PyTorch too, so it is not an ONNX Runtime problem: "
                f"{ortmodule.describe_error(error)}. To fix: correct the training data "
                "(class labels from 0 to `num_labels` - 1, integer labels for a classifier, token ids below the "
                "vocabulary size)."
            ) from error

    def _pad_to_bucket(self, inputs: dict) -> dict:
        config = self.model.config
        max_length = getattr(config, "max_position_embeddings", None)
        inputs = pad_to_multiple(
            inputs,
            COMPILE_LENGTH_MULTIPLE,
            config.pad_token_id or 0,
            max_length,
            labels_too=self._labels_follow_inputs(),
        )
        labels = inputs.get("labels")
        if config.is_encoder_decoder and "decoder_input_ids" not in inputs and torch.is_tensor(labels):
            # The decoder's inputs come from the labels: their length is bucketed too, the new labels ignored.
            labels_only = pad_to_multiple(
                {"attention_mask": labels, "labels": labels}, COMPILE_LENGTH_MULTIPLE, 0, None, labels_too=True
            )
            inputs = {**inputs, "labels": labels_only["labels"]}
        return inputs

    def _describe_failure(self, model, error: BaseException) -> str:
        if self._backend != "compile":
            return ortmodule.describe_failure(model, error)
        from . import compile_backend

        return compile_backend.describe_failure(model, error)

    def _fall_back_to_pytorch(self, reason: str):
        logger.warning("%s Training continues in PyTorch (`--ort_fallback pytorch`).", reason)
        self._fallback_reason = reason
        self._pytorch_fallback = self.model_wrapped = self.accelerator.prepare_model(self.model)
        return self._pytorch_fallback

    def _report_backend(self, model):
        self._backend_reported = True
        device = self.args.device
        if not self.args.use_ort:
            logger.info("Training backend: PyTorch on %s (`--use_ort False`).", device)
        elif self._pytorch_fallback is not None:
            logger.warning("Training backend: PyTorch on %s, not ONNX Runtime. %s", device, self._fallback_reason)
        elif self._backend == "compile":
            from . import compile_backend

            stats = self._compile_stats()
            if stats.session_runs == 0:
                raise ortmodule.ORTTrainingError(
                    "The compile backend ran no ONNX Runtime session in the first training step: the model ran in "
                    "PyTorch. To fix: pass `--ort_fallback pytorch`, or `--use_ort False`."
                )
            provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
            logger.info(
                "Training backend: ONNX Runtime (compile backend, %s, %s%s) on %s: %s. %d graphs built (%d exported "
                "in %.1f s, %d read from the cache in %s).",
                provider,
                "fp16" if self.args.fp16 else "fp32",
                ", CUDA graphs" if self.args.ort_cuda_graphs else "",
                device,
                self._backend_reason,
                stats.graphs_built,
                stats.graphs_exported,
                stats.export_seconds,
                stats.graphs_from_cache,
                compile_backend.graph_cache_dir(),
            )
            if stats.session_runs > 2:  # one forward and one backward graph per captured region
                logger.info(
                    "Graph breaks split the model into %d ONNX Runtime graphs; the code between them runs in PyTorch "
                    "(TORCH_LOGS=graph_breaks says where).",
                    stats.session_runs // 2,
                )
        else:
            status = ortmodule.ortmodule_status(self.accelerator.unwrap_model(model))
            logger.info("Training backend: %s on %s. ORTModule (%s).", status.backend, device, self._backend_reason)

    def _inference_in_ort(self) -> bool:
        """`--inference_with_ort`, for the heads it covers, unless the model is on a GPU this ONNX Runtime cannot
        use and `--ort_inference_without_cuda pytorch` asks for PyTorch then."""
        if not self.args.inference_with_ort:
            return False
        if not inference.supports(self.model):
            logger.warning(
                "Evaluation backend: PyTorch on %s. `--inference_with_ort` runs sequence and token classifiers, "
                "encoder-decoder and decoder-only language models; %s is none of these.",
                self.args.device,
                type(self.model).__name__,
            )
            return False
        available = onnxruntime_providers()
        return inference.select_provider(self.args.device, available, self.args.ort_inference_without_cuda) is not None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        if not self._inference_in_ort():
            return super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        start = time.perf_counter()
        self._inference_model = self._load_inference_model(dataloader)
        setup_seconds = time.perf_counter() - start
        # Quantized sessions are measured against their fp32 graph on the same data, through the same loop.
        reference = self._inference_model.reference if self.args.ort_quantization_check else None
        loop_args = (
            dataloader,
            description,
            prediction_loss_only and reference is None,
            ignore_keys,
            metric_key_prefix,
        )
        output = self._evaluation_loop_in(self._inference_model, *loop_args)
        if reference is not None:
            fp32 = self._evaluation_loop_in(reference, *loop_args)
            pad_token_id = getattr(self.model.config, "pad_token_id", None) or 0
            output.metrics.update(_quantization_metrics(output, fp32, metric_key_prefix, pad_token_id))
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
                self.model,
                sample,
                directory,
                fp16=self.args.fp16,
                quantize=self.args.ort_quantization == "dynamic_int8",
            )
        logger.info(inference_model.description())
        return inference_model

    def _takes_attention_mask(self) -> bool:
        return isinstance(self.model, PreTrainedModel) and "attention_mask" in self._forward_parameters()

    def _can_trim_padding(self) -> bool:
        """Only transformers models that mask padding out of attention give equal results on trimmed batches."""
        return self.args.trim_padding and self._takes_attention_mask()

    def _trimmed(self, inputs: dict) -> dict:
        """The batch without its all-padding columns, with `--trim_padding`, whatever the backend."""
        if not self._can_trim_padding():
            return inputs
        return trim_padding(inputs, labels_too=self._labels_follow_inputs())

    def _labels_follow_inputs(self) -> bool:
        """Whether the labels are aligned with the input tokens, so that they are trimmed and padded with them.
        Encoder-decoder labels are target tokens: never."""
        return not self.model.config.is_encoder_decoder

    def _forward_parameters(self) -> list:
        return list(inspect.signature(self.model.forward).parameters)

    def _inference_inputs(self, inputs: dict) -> dict:
        accepted = self._forward_parameters()
        model_inputs = {
            name: value
            for name, value in inputs.items()
            if name in accepted and name not in self.label_names and torch.is_tensor(value)
        }
        return self._trimmed(model_inputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not self._eval_batches_prepared:
            inputs = self._trimmed(inputs)
        if self._running_in is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        # The Trainer computes losses, label smoothing, `compute_loss_func` and generation as always; the model's
        # forward (and generation steps) compute in ONNX Runtime meanwhile. The plain model, not the wrapper the
        # loop holds (DDP around the training ORTModule), whose forward would not reach the sessions.
        with self._running_in.running(self.model):
            return super().prediction_step(self.model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)

    def _save(self, output_dir=None, state_dict=None):
        with self._user_settings():
            super()._save(output_dir, state_dict)


class Seq2SeqORTTrainer(ORTTrainer, Seq2SeqTrainer):
    """A `Seq2SeqTrainer` whose training runs in ONNX Runtime, as `ORTTrainer`'s does; with `inference_with_ort`,
    `predict_with_generate` generates in ONNX Runtime sessions (encoder, cross-attention, decoder, decoder with
    past)."""

    _args_class = ORTSeq2SeqTrainingArguments


# The name Optimum used, for users moving over.
ORTSeq2SeqTrainer = Seq2SeqORTTrainer
