"""`ORTTrainer` and `Seq2SeqORTTrainer`: the `transformers` trainers, training in ONNX Runtime through ORTModule
or through the compile backend (`compile_backend.py`), as `--ort_backend` chooses.

Only hooks are overridden, each around a `super()` call (written against transformers 5.23):
- `_wrap_model` puts the model in an ORTModule, or compiles it with the compile backend, for training and lets
  accelerate wrap that (DDP outside ORT);
- `get_optimizer_cls_and_kwargs` adds ORT's FusedAdam;
- `compute_loss` runs the loss inside the ORT graph with `--use_module_with_loss`;
- `training_step` drops all-padding columns (and for the compile backend pads lengths up to a few buckets, one
  graph each), and on the first step reports which backend really ran (or why
  ORT could not, then fails or falls back to PyTorch);
- `train` and `_save` switch the model to what ORT can differentiate for training and back;
- `evaluation_loop` and `prediction_step` run `--inference_with_ort` in an InferenceSession; for
  sequence-to-sequence models `Seq2SeqTrainer`'s generation runs with ONNX Runtime sessions in place of the model.
`self.model` stays the plain model, so checkpoints are ordinary Hugging Face checkpoints.
"""

import contextlib
import dataclasses
import inspect
import logging
import os
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer, TrainingArguments

from . import generation, onnx, ortmodule
from .import_utils import onnxruntime_providers
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
    attention = model.config._attn_implementation
    if attention != "eager":
        model.set_attn_implementation("eager")  # may replace config objects: collect them after
    configs = _configs_with_cache(model)
    user_values = [config.use_cache for config in configs]
    try:
        with _use_cache(configs, [False] * len(configs)):
            yield lambda: _use_cache(configs, user_values)
    finally:
        if attention != "eager":
            model.set_attn_implementation(attention)


SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def trim_padding(inputs: dict, labels_too: bool = False) -> dict:
    """Drop the trailing columns that are padding in every row of the batch. Padded positions are masked out of
    attention and their labels ignored, so results stay equal while the work shrinks to the longest real sequence
    (ONNX Runtime's own padding elimination exists only in its CUDA build). Left padding is kept, since absolute
    positions would move. `labels_too` trims per-token labels as well."""
    mask = inputs.get("attention_mask")
    if not torch.is_tensor(mask) or mask.dim() != 2 or not mask.any():
        return inputs
    width = mask.shape[1]
    length = int(mask.any(0).nonzero().max()) + 1
    if length == width:
        return inputs
    names = SEQUENCE_INPUTS + (("labels",) if labels_too else ())
    return {
        name: value[:, :length] if name in names and torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == width else value
        for name, value in inputs.items()
    }


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
        if name in fill and torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == width else value
        for name, value in inputs.items()
    }


def _as_ort_arguments(args: TrainingArguments | None, args_class: type) -> TrainingArguments:
    """Accept a plain `TrainingArguments` (ORT options at their defaults), as `TRL` trainers accept theirs."""
    if args is None or isinstance(args, args_class):
        return args
    values = {key: value for key, value in args.to_dict().items() if not key.startswith("_")}
    values["hub_token"] = args.hub_token
    return args_class(**values)


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
        if args is None:
            args = self._args_class(output_dir="trainer_output")
        super().__init__(model, _as_ort_arguments(args, self._args_class), *positional, **kwargs)
        self._user_settings = contextlib.nullcontext  # restores the user's model settings while saving
        self._backend_reported = False
        self._pytorch_fallback = None  # the model trained in PyTorch after ORT failed, with `--ort_fallback pytorch`
        self._fallback_reason = ""
        self._backend, self._backend_reason = "", ""  # `ortmodule` or `compile`, and why
        self._onnx_model, self._onnx_weights = None, None  # `--inference_with_ort`'s session, for these weights

    def train(self, *args, **kwargs):
        if not self.args.use_ort:
            return super().train(*args, **kwargs)
        self._backend_reported, self._pytorch_fallback = False, None
        self._backend, self._backend_reason = self.args.training_backend()
        with _prepared_for_ort_training(self.model) as user_settings, self._graph_limits():
            self._user_settings = user_settings
            try:
                output = super().train(*args, **kwargs)
            finally:
                self._user_settings = contextlib.nullcontext
        if self._backend == "compile" and self._pytorch_fallback is None:
            stats = self._compile_stats()
            logger.info(
                "Compile backend: %d graphs for this model (%d exported in %.1f s, %d read from the cache).",
                stats.graphs_built, stats.graphs_exported, stats.export_seconds, stats.graphs_from_cache,
            )
            output.metrics.update(ort_graphs=stats.graphs_built, ort_export_seconds=round(stats.export_seconds, 3))
        return output

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

            ort_model = compile_backend.compile_model(to_wrap)
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
        if self._pytorch_fallback is not None:
            model = self._pytorch_fallback  # the training loop still holds the ORTModule it was given
        elif self.args.use_ort and self._can_trim_padding():
            # Encoder-decoder labels are target tokens, not aligned with the input: never trimmed.
            inputs = trim_padding(inputs, labels_too=not self.model.config.is_encoder_decoder)
            if self._backend == "compile":
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
            if self.args.ort_fallback == "error":
                raise ortmodule.ORTTrainingError(
                    f"{reason} To fix: pass `--ort_fallback pytorch` to train in PyTorch when ORT cannot, "
                    "or `--use_ort False`."
                ) from error
            model = self._fall_back_to_pytorch(reason)
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._report_backend(model, time.perf_counter() - start)
        return loss

    def _pad_to_bucket(self, inputs: dict) -> dict:
        config = self.model.config
        max_length = getattr(config, "max_position_embeddings", None)
        inputs = pad_to_multiple(
            inputs, COMPILE_LENGTH_MULTIPLE, config.pad_token_id or 0, max_length, labels_too=not config.is_encoder_decoder
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

    def _report_backend(self, model, first_step_seconds: float):
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
                "Training backend: ONNX Runtime (compile backend, %s, %s) on %s: %s. %d graphs built (%d exported "
                "in %.1f s, %d read from the cache in %s).",
                provider, "fp16" if self.args.fp16 else "fp32", device, self._backend_reason, stats.graphs_built,
                stats.graphs_exported, stats.export_seconds, stats.graphs_from_cache,
                compile_backend.graph_cache_dir(),
            )
            if stats.session_runs > 2:  # one forward and one backward graph per captured region
                logger.info(
                    "Graph breaks split the model into %d ONNX Runtime graphs; the code between them runs in PyTorch "
                    "(TORCH_LOGS=graph_breaks says where).", stats.session_runs // 2,
                )
        else:
            status = ortmodule.ortmodule_status(self.accelerator.unwrap_model(model))
            logger.info("Training backend: %s on %s. ORTModule (%s).", status.backend, device, self._backend_reason)
            if device.type == "cpu":
                logger.info(
                    "On CPU, ONNX Runtime trains a BERT-base about 0.9x as fast as PyTorch on the same tokens; its "
                    "gain comes from `--ort_trim_padding` on padded batches (see docs/benchmarks.md)."
                )
        # The first step includes ORT's export and graph build: recorded apart, for benchmarks.
        self.log({"first_step_seconds": round(first_step_seconds, 3)})

    def _inference_in_ort(self) -> bool:
        """`--inference_with_ort`, unless the model is on a GPU this ONNX Runtime cannot use and
        `--ort_inference_without_cuda pytorch` asks for PyTorch then."""
        if not self.args.inference_with_ort:
            return False
        available = onnxruntime_providers()
        return onnx.select_provider(self.args.device, available, self.args.ort_inference_without_cuda) is not None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        if not self._inference_in_ort():
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        start = time.perf_counter()
        self._onnx_model = self._load_onnx_model(dataloader)
        setup_seconds = time.perf_counter() - start
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # Export and session creation (or reuse) are part of the runtime; recorded apart, for benchmarks.
        output.metrics[f"{metric_key_prefix}_ort_setup_seconds"] = round(setup_seconds, 3)
        return output

    def _load_onnx_model(self, dataloader):
        # Parameters change in place, which bumps their version counters: equal counters, same weights.
        weights = tuple((tensor.data_ptr(), tensor._version) for tensor in self.model.state_dict().values())
        if self._onnx_model is not None and weights == self._onnx_weights:
            return self._onnx_model
        self._onnx_weights = weights
        sample = self._inference_inputs(self._prepare_inputs(next(iter(dataloader))))
        directory = Path(self.args.output_dir) / "onnx"
        # One rank exports (or reuses a current export); the others then load what it wrote. One per machine
        # when machines do not share the output folder (`--save_on_each_node`).
        with self.args.main_process_first(local=self.args.save_on_each_node, desc="ONNX export"):
            if self.model.config.is_encoder_decoder and self.model.can_generate():
                onnx_model = generation.load_seq2seq_onnx_model(
                    self.model, sample["input_ids"], sample["attention_mask"], directory, fp16=self.args.fp16
                )
                graphs = ", ".join(session.path.name for session in onnx_model.sessions)
                logger.info(
                    "Evaluation and generation backend: ONNX Runtime on %s (%s in %s, precision: %s).",
                    onnx_model.provider, graphs, directory, onnx_model.encoder.optimization,
                )
            else:
                onnx_model = onnx.load_onnx_model(self.model, sample, directory, fp16=self.args.fp16)
                logger.info(
                    "Evaluation backend: ONNX Runtime on %s (%s, optimisation and precision: %s).",
                    onnx_model.provider, onnx_model.path, onnx_model.optimization,
                )
        return onnx_model

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
        if not self.args.inference_with_ort or self._onnx_model is None:  # PyTorch, asked for or as the fallback
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        if isinstance(self._onnx_model, generation.ONNXSeq2SeqModel):
            # `Seq2SeqTrainer` generates and computes the loss as always; the model's forward and encoder are the
            # ONNX Runtime sessions meanwhile.
            with generation.running_in_session(self.model, self._onnx_model):
                return super().prediction_step(self.model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        logits = self._onnx_model(self._inference_inputs(inputs))["logits"]
        if logits.dim() == 3:  # token classification: back to the batch's padded length, for the labels
            logits = torch.nn.functional.pad(logits, (0, 0, 0, inputs["input_ids"].shape[1] - logits.shape[1]))
        labels = inputs.get("labels")
        loss = onnx.task_loss(self.model, logits, labels) if labels is not None else None
        return loss, None if prediction_loss_only else logits, labels

    def _save(self, output_dir=None, state_dict=None):
        with self._user_settings():
            super()._save(output_dir, state_dict)


class Seq2SeqORTTrainer(ORTTrainer, Seq2SeqTrainer):
    """A `Seq2SeqTrainer` whose training runs in ONNX Runtime, as `ORTTrainer`'s does; with `inference_with_ort`,
    `predict_with_generate` generates in ONNX Runtime sessions (encoder, cross-attention, decoder, decoder with past)."""

    _args_class = ORTSeq2SeqTrainingArguments


# The name Optimum used, for users moving over.
ORTSeq2SeqTrainer = Seq2SeqORTTrainer
