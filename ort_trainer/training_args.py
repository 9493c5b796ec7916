"""`TrainingArguments` with the ONNX Runtime options, usable from `HfArgumentParser`."""

import warnings
from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .import_utils import (
    ORT_INSTALL_HINT,
    ORT_TRAINING_INSTALL_HINT,
    is_onnxruntime_available,
    is_onnxruntime_training_available,
    is_onnxscript_available,
    onnxruntime_distribution,
    onnxruntime_providers,
)


ORT_FUSED_ADAM = "adamw_ort_fused"
ORT_BACKENDS = ("auto", "ortmodule", "compile")
ORT_LOG_LEVELS = ("VERBOSE", "DEVINFO", "INFO", "WARNING", "FATAL")
ORT_QUANTIZATIONS = ("none", "dynamic_int8")


@dataclass
class ORTTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the switches of ONNX Runtime training (`--use_ort`, `--ort_*`, `--save_onnx`)."""

    use_ort: bool = field(
        default=True,
        metadata={
            "help": "Train with ONNX Runtime (ORTModule). `--use_ort False` runs the same script in plain PyTorch, "
            "for side-by-side comparison."
        },
    )
    ort_backend: str = field(
        default="auto",
        metadata={
            "help": "How ONNX Runtime trains: `ortmodule` (onnxruntime-training's ORTModule), `compile` (a "
            "torch.compile backend running PyTorch's forward and backward graphs in ONNX Runtime sessions, with any "
            "onnxruntime build), `auto`: ORTModule where onnxruntime-training is installed and has this device's "
            "provider, else compile.",
            "choices": list(ORT_BACKENDS),
        },
    )
    ort_cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "With the compile backend on CUDA: ONNX Runtime captures each forward and backward graph as a "
            "CUDA graph and replays it, one launch a graph instead of one a kernel (shapes are static there). "
            "Dropout's masks are drawn by PyTorch at each step, outside the graphs."
        },
    )
    optim: str = field(
        default="adamw_torch",
        metadata={
            "help": f"The optimizer: any `transformers` name, or `{ORT_FUSED_ADAM}` (ONNX Runtime's FusedAdam, CUDA "
            "only)."
        },
    )
    use_module_with_loss: bool = field(
        default=False,
        metadata={
            "help": "Compute the loss inside the ONNX Runtime graph too (model and loss exported as one module). "
            "Useful with `compute_loss_func` or label smoothing, whose loss is otherwise computed in PyTorch."
        },
    )
    ort_fallback: str = field(
        default="pytorch",
        metadata={
            "help": "What to do when ONNX Runtime cannot run the model: `pytorch` falls back to PyTorch with one "
            "warning naming the cause; `error` stops (use it in CI and benchmarks).",
            "choices": ["pytorch", "error"],
        },
    )
    ort_memory_optimization_level: int = field(
        default=0,
        metadata={
            "help": "ONNX Runtime memory optimisation: 0 off, 1 transformer layer-wise recompute, "
            "2 layer-wise recompute including compromised subgraphs.",
            "choices": [0, 1, 2],
        },
    )
    ort_sparsity_optimization: bool = field(
        default=True,
        metadata={
            "help": "Let ONNX Runtime skip padded embedding and ignored label positions in compute (its CUDA build "
            "removes embedding padding; both builds skip ignored labels)."
        },
    )
    ort_log_level: str = field(
        default="WARNING",
        metadata={"help": "Log level of ONNX Runtime training.", "choices": list(ORT_LOG_LEVELS)},
    )
    trim_padding: bool = field(
        default=True,
        metadata={
            "help": "Before each training step and evaluation batch, in ONNX Runtime or PyTorch alike, drop the "
            "columns "
            "that are padding in every row (trailing, masked, labels ignored), so batches padded to `max_seq_length` "
            "cost only their longest real sequence. Results stay equal. Applies to transformers models."
        },
    )
    ort_trim_padding: bool | None = field(
        default=None, metadata={"help": "Deprecated: the old name of `--trim_padding`, which it sets."}
    )
    inference_with_ort: bool = field(
        default=False,
        metadata={
            "help": "Evaluate and predict with the exported ONNX model in an onnxruntime.InferenceSession instead "
            "of PyTorch (sequence and token classification, and sequence-to-sequence generation). Works with any "
            "ONNX Runtime build."
        },
    )
    ort_inference_without_cuda: str = field(
        default="cpu",
        metadata={
            "help": "With `--inference_with_ort`, when the model is on a GPU but the installed ONNX Runtime has no "
            "CUDAExecutionProvider: `cpu` evaluates with ONNX Runtime on the CPU, `pytorch` in PyTorch on the GPU.",
            "choices": ["cpu", "pytorch"],
        },
    )
    ort_quantization: str = field(
        default="none",
        metadata={
            "help": "With `--inference_with_ort` on CPU: `dynamic_int8` evaluates classifiers and sequence-to-"
            "sequence models with ONNX Runtime's dynamic quantization (int8 weights, activations quantized per "
            "batch), built once from the fp32 graphs.",
            "choices": list(ORT_QUANTIZATIONS),
        },
    )
    ort_quantization_check: bool = field(
        default=True,
        metadata={
            "help": "With `--ort_quantization dynamic_int8`, evaluate the fp32 graph too and report its metrics "
            "(`eval_fp32_*`) and the share of predictions (generated sentences) the int8 graph keeps "
            "(`eval_int8_agreement`). "
            "`False` skips that second pass."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty `output_dir` anyway (without it the example scripts refuse, to keep what "
            "is there)."
        },
    )
    save_onnx: bool = field(
        default=False,
        metadata={"help": "Save the ONNX training graphs ORTModule builds (for debugging) under `<output_dir>/onnx`."},
    )
    onnx_prefix: str = field(
        default="",
        metadata={
            "help": "File name prefix of the graphs saved with `--save_onnx` (default: the model's class name)."
        },
    )

    def __post_init__(self):
        if self.ort_trim_padding is not None:
            warnings.warn(
                "`--ort_trim_padding` is deprecated and will be removed: use `--trim_padding`, which trims the "
                "batches "
                "of PyTorch runs too.",
                FutureWarning,
            )
            self.trim_padding, self.ort_trim_padding = self.ort_trim_padding, None
        use_fused_adam = self.optim == ORT_FUSED_ADAM
        if use_fused_adam:
            self.optim = "adamw_torch"  # validated by the parent; replaced by FusedAdam in the trainer
        super().__post_init__()
        if use_fused_adam:
            self.optim = ORT_FUSED_ADAM
        self._check_ort_options()

    def _check_ort_options(self):
        if self.ort_fallback not in ("pytorch", "error"):
            raise ValueError(f"`--ort_fallback` must be `pytorch` or `error`, got `{self.ort_fallback}`.")
        if self.ort_memory_optimization_level not in (0, 1, 2):
            raise ValueError(
                f"`--ort_memory_optimization_level` must be 0, 1 or 2, got {self.ort_memory_optimization_level}."
            )
        if self.ort_log_level.upper() not in ORT_LOG_LEVELS:
            raise ValueError(
                f"`--ort_log_level` must be one of {', '.join(ORT_LOG_LEVELS)}, got `{self.ort_log_level}`."
            )
        if self.ort_quantization not in ORT_QUANTIZATIONS:
            raise ValueError(
                f"`--ort_quantization` must be one of {', '.join(ORT_QUANTIZATIONS)}, got `{self.ort_quantization}`."
            )
        if self.ort_quantization != "none" and not self.inference_with_ort:
            raise ValueError(
                f"`--ort_quantization {self.ort_quantization}` quantizes the ONNX Runtime evaluation graph, but "
                "`--inference_with_ort` is off. To fix: add `--inference_with_ort`, or drop `--ort_quantization`."
            )
        if self.ort_backend not in ORT_BACKENDS:
            raise ValueError(f"`--ort_backend` must be one of {', '.join(ORT_BACKENDS)}, got `{self.ort_backend}`.")
        if self.use_ort and not is_onnxruntime_available():
            raise ValueError(
                f"ONNX Runtime is not installed. To fix: {ORT_INSTALL_HINT}, or pass `--use_ort False` to train "
                "with PyTorch."
            )
        if self.use_ort and self.ort_backend == "ortmodule" and not is_onnxruntime_training_available():
            raise ValueError(
                f"`--ort_backend ortmodule` needs onnxruntime-training, not {onnxruntime_distribution()}. To fix: "
                f"{ORT_TRAINING_INSTALL_HINT}, or pass `--ort_backend compile`."
            )
        if self.use_ort and self.training_backend()[0] == "compile" and not is_onnxscript_available():
            raise ValueError(
                "The compile backend exports its graphs with onnxscript, which is not installed. To fix: "
                "pip install onnxscript."
            )
        if self.optim == ORT_FUSED_ADAM and self.device.type != "cuda":
            raise ValueError(
                f"`--optim {ORT_FUSED_ADAM}` runs only on CUDA, but this run uses {self.device.type}. "
                "To fix: use `--optim adamw_torch` on CPU."
            )
        if self.bf16 and self.use_ort and self.device.type == "cpu":
            raise ValueError(
                "`--bf16` with ONNX Runtime training needs a GPU: ONNX Runtime's CPU build has no bf16 kernels. "
                "To fix: drop `--bf16`, or train in bf16 with PyTorch (`--use_ort False`)."
            )
        if self.bf16 and self.use_ort and self.training_backend()[0] == "compile":
            raise ValueError(
                "`--bf16` with the compile backend is not supported: ONNX Runtime's I/O binding takes no bf16 tensors "
                "from PyTorch. To fix: use `--fp16` on a GPU, or train in bf16 with PyTorch (`--use_ort False`)."
            )
        if (
            self.ort_cuda_graphs
            and self.use_ort
            and (self.device.type != "cuda" or self.training_backend()[0] != "compile")
        ):
            raise ValueError(
                f"`--ort_cuda_graphs` replays the compile backend's graphs on CUDA, but this run trains with "
                f"{self.training_backend()[0]} on {self.device.type}. To fix: drop `--ort_cuda_graphs`, or train on a "
                "GPU with `--ort_backend compile`."
            )
        if self.fp16 and self.device.type == "cpu":
            raise ValueError(
                "`--fp16` needs a GPU, and this run is on CPU. To fix: drop `--fp16`, or use `--bf16 --use_cpu`."
            )

    def training_backend(self) -> tuple[str, str]:
        """The backend that trains with these arguments on this machine (`ortmodule` or `compile`), and why."""
        if self.ort_backend != "auto":
            return self.ort_backend, f"`--ort_backend {self.ort_backend}`"
        if not is_onnxruntime_training_available():
            return "compile", f"`--ort_backend auto` with {onnxruntime_distribution()}, not onnxruntime-training"
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime_providers():
            return "compile", f"`--ort_backend auto`: {onnxruntime_distribution()} has no CUDA provider"
        return "ortmodule", f"`--ort_backend auto` with {onnxruntime_distribution()}"


@dataclass
class ORTSeq2SeqTrainingArguments(ORTTrainingArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` with the ONNX Runtime options of `ORTTrainingArguments`."""
