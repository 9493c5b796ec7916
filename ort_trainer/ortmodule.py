"""Everything that knows ONNX Runtime's training internals (ORTModule 1.19) and how newer torch differs from
the torch it was built for. The rest of the package calls `load_ortmodule()`, `wrap_with_ortmodule()` and
`ortmodule_status()`; nothing else reaches into `onnxruntime.training`.

ORT 1.19.2 is the last `onnxruntime-training` release. On today's torch it needs:
- moved `torch.onnx` internals to resolve under their old names (added as aliases; torch is not changed);
- its `aten_op_executor` C++ extension, compiled here on first use into a cache outside site-packages;
- `torch_interop_utils` (custom autograd.Function support) to import, although it no longer compiles: custom
  autograd functions stay off (`ORTMODULE_ENABLE_CUSTOM_AUTOGRAD=0`), so it is never called;
- its NVTX markers skipped on CPU-only torch builds;
- its own `torch.onnx.export` call to use the TorchScript exporter (`dynamo=False`); user calls keep torch's default.
It also keeps ORT's export rules (ATen fallbacks) out of other exports, and fixes one ORT crash (turning sparsity
optimisation off broke its export).
Each fix is applied only when the running torch shows the need.
"""

import contextlib
import importlib
import inspect
import logging
import os
import sys
import traceback
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .import_utils import ORT_TRAINING_INSTALL_HINT, is_onnxruntime_training_available


logger = logging.getLogger(__name__)

# As onnxruntime is first imported, onnxruntime-training checks ORTModule and keeps the error it meets (its
# extensions are built later, by `load_ortmodule`) with the error's traceback, whose frames reach every frame
# running at that moment. Imported inside `ORTTrainer.train` or a script's `main()`, that would keep the trainer,
# its model and its process group alive until the interpreter exits, where gloo's worker threads, releasing the
# last tensors of a collective, can abort the process. Imported here, it keeps only the frames importing ort_trainer.
if is_onnxruntime_training_available():
    import onnxruntime  # noqa: F401

_ORT_EXTENSIONS = "onnxruntime.training.ortmodule.torch_cpp_extensions"

# Old import name -> where torch keeps it now (the TorchScript exporter moved in torch 2.9).
_MOVED_TORCH_ONNX_MODULES = {
    "torch.onnx._internal.jit_utils": "torch.onnx._internal.torchscript_exporter.jit_utils",
    "torch.onnx._type_utils": "torch.onnx._internal.torchscript_exporter._type_utils",
    "torch.onnx._globals": "torch.onnx._internal.torchscript_exporter._globals",
}


class ORTTrainingUnavailableError(ImportError):
    """ORT training was asked for but cannot run in this environment."""


class ORTTrainingError(RuntimeError):
    """ONNX Runtime could not export or run the model, and falling back to PyTorch was not allowed."""


def cache_dir() -> Path:
    """Where compiled extensions live: `$ORT_TRAINER_CACHE`, else `~/.cache/ort_trainer`."""
    return Path(os.environ.get("ORT_TRAINER_CACHE", Path.home() / ".cache" / "ort_trainer"))


def _module_importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _alias_moved_torch_onnx_modules():
    for old, new in _MOVED_TORCH_ONNX_MODULES.items():
        if not _module_importable(old) and _module_importable(new):
            sys.modules[old] = importlib.import_module(new)
    if not _module_importable("torch.onnx._internal._beartype"):
        # ORT only uses its `beartype` decorator, which type-checked arguments at run time.
        shim = types.ModuleType("torch.onnx._internal._beartype")
        shim.beartype = lambda fn: fn
        sys.modules[shim.__name__] = shim


def _build_aten_op_executor():
    """Compile (once, cached) and register ORT's aten_op_executor extension, which runs ATen ops inside ORT."""
    source = (
        Path(importlib.util.find_spec("onnxruntime").submodule_search_locations[0])
        / "training/ortmodule/torch_cpp_extensions/cpu/aten_op_executor/aten_op_executor.cc"
    )
    version_tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    build_dir = cache_dir() / "torch_extensions" / version_tag / "aten_op_executor"
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    if not any(build_dir.glob("aten_op_executor*.so")):
        logger.warning(
            "Compiling ONNX Runtime's aten_op_executor extension once into %s (about a minute)...", build_dir
        )
    try:
        # torch's loader locks the build directory, so concurrent ranks build it once and share it.
        extension = cpp_extension.load(
            name="aten_op_executor", sources=[str(source)], build_directory=str(build_dir), verbose=False
        )
    except Exception as error:  # compiler missing, or torch headers it cannot build against
        raise ORTTrainingUnavailableError(
            f"Could not compile ONNX Runtime's aten_op_executor extension in {build_dir}: {_build_failure(error)}. "
            "To fix: install a C++ compiler and Python headers (e.g. `apt-get install g++ python3-dev`), "
            "or train with `--use_ort False`."
        ) from error
    sys.modules[f"{_ORT_EXTENSIONS}.aten_op_executor"] = extension


def _build_failure(error: Exception) -> str:
    """The line of a compiler log that says what went wrong (`c++: not found`, `fatal error: Python.h ...`)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    telling = [line for line in lines if "error:" in line.lower() or "not found" in line.lower()]
    return (telling or lines)[0][:300]


def _stub_torch_interop_utils():
    """torch_interop_utils serves only custom autograd.Function support, kept off; ORT still imports the name."""
    name = f"{_ORT_EXTENSIONS}.torch_interop_utils"
    if name in sys.modules:
        return

    def unavailable(*args, **kwargs):
        raise RuntimeError("torch_interop_utils is not built: custom autograd.Function support is off in ort_trainer.")

    stub = types.ModuleType(name)
    stub.__getattr__ = lambda attr: unavailable
    sys.modules[name] = stub


def _skip_nvtx_without_cuda():
    """CPU-only torch raises on NVTX calls; ORT calls them around every step."""
    if torch.cuda.is_available():
        return
    from onnxruntime.training.utils import torch_profile_utils

    torch_profile_utils.torch_nvtx_range_push = lambda msg: None
    torch_profile_utils.torch_nvtx_range_pop = lambda: None


def _use_torchscript_exporter():
    """torch >= 2.9 exports with dynamo by default; ORTModule's graph building needs the TorchScript exporter."""
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        return
    from onnxruntime.training.ortmodule._graph_transition_manager import GraphTransitionManager

    if getattr(GraphTransitionManager.__init__, "_ort_trainer_patched", False):
        return
    original_init = GraphTransitionManager.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._export_extra_kwargs.setdefault("dynamo", False)

    __init__._ort_trainer_patched = True
    GraphTransitionManager.__init__ = __init__


def _fix_disabled_label_sparsity_hook():
    """ORT 1.19 returns None instead of an empty hook list when sparsity optimisation is off, then iterates it."""
    from onnxruntime.training.ortmodule._graph_transition_manager import GraphTransitionManager

    add_hook = GraphTransitionManager._add_check_label_sparsity_hook
    if getattr(add_hook, "_ort_trainer_patched", False):
        return

    def _add_check_label_sparsity_hook(*args, **kwargs):
        return add_hook(*args, **kwargs) or []

    _add_check_label_sparsity_hook._ort_trainer_patched = True
    GraphTransitionManager._add_check_label_sparsity_hook = staticmethod(_add_check_label_sparsity_hook)


def _stop_spinning_between_runs():
    """ORT's CPU threads spin for work after each forward and backward run by default, taking the cores from the
    PyTorch code in between (loss, autograd, optimizer step)."""
    from onnxruntime.training.ortmodule._graph_execution_manager import GraphExecutionManager

    get_session_config = GraphExecutionManager._get_session_config
    if getattr(get_session_config, "_ort_trainer_patched", False):
        return

    def _get_session_config(self):
        session_options, providers, provider_options = get_session_config(self)
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return session_options, providers, provider_options

    _get_session_config._ort_trainer_patched = True
    GraphExecutionManager._get_session_config = _get_session_config


def _ort_symbolics(register: bool, opset: int):
    from onnxruntime.tools import pytorch_export_contrib_ops
    from onnxruntime.training.ortmodule._custom_op_symbolic_registry import CustomOpSymbolicRegistry

    if register:
        CustomOpSymbolicRegistry.register_all(opset)
        pytorch_export_contrib_ops.register()
        return
    for name in CustomOpSymbolicRegistry._SYMBOLICS:
        torch.onnx.unregister_custom_op_symbolic(name, opset)
    pytorch_export_contrib_ops.unregister()


def _keep_ort_symbolics_inside_its_exports():
    """ORTModule registers its ATen and contrib-op export rules in torch for good, which would put ORT-only ATen
    nodes into every later `torch.onnx.export`. Here they exist only while ORTModule exports its own graph."""
    from onnxruntime.training.ortmodule._graph_transition_manager import GraphTransitionManager

    export_model = GraphTransitionManager._export_model
    if getattr(export_model, "_ort_trainer_patched", False):
        return

    def _export_model(*args, **kwargs):
        opset = kwargs["onnx_opset_version"]
        _ort_symbolics(register=True, opset=opset)
        try:
            return export_model(*args, **kwargs)
        finally:
            _ort_symbolics(register=False, opset=opset)

    _export_model._ort_trainer_patched = True
    GraphTransitionManager._export_model = staticmethod(_export_model)


@lru_cache
def load_ortmodule():
    """Import `ORTModule`, making ORT 1.19 work on the running torch first. Returns the `ORTModule` class."""
    if not is_onnxruntime_training_available():
        raise ORTTrainingUnavailableError(
            "ORT training needs onnxruntime-training, which is not installed. "
            f"To fix: {ORT_TRAINING_INSTALL_HINT}, or train with `--use_ort False`."
        )
    _alias_moved_torch_onnx_modules()
    _build_aten_op_executor()
    _stub_torch_interop_utils()
    os.environ.setdefault("ORTMODULE_ENABLE_CUSTOM_AUTOGRAD", "0")
    from onnxruntime.training import ortmodule

    # ORT looks for compiled extensions only inside its own package folder; ours is registered by import name.
    if "extensions were not detected" in str(ortmodule._FALLBACK_INIT_EXCEPTION or ""):
        ortmodule._FALLBACK_INIT_EXCEPTION = None
    _skip_nvtx_without_cuda()
    _use_torchscript_exporter()
    _fix_disabled_label_sparsity_hook()
    _keep_ort_symbolics_inside_its_exports()
    _stop_spinning_between_runs()
    return ortmodule.ORTModule


@dataclass
class ORTModuleOptions:
    """The ORTModule settings ort_trainer exposes. ORT 1.19 reads most of them from the environment when an
    ORTModule is built, so they are set only for that moment."""

    memory_optimization_level: int = 0
    sparsity_optimization: bool = True
    log_level: str = "WARNING"
    save_onnx: bool = False
    onnx_prefix: str = ""
    save_onnx_path: str = ""

    def environment(self) -> dict:
        """Environment variables to set while the ORTModule is built (None: unset)."""
        return {
            # ORT falls back only for some of its own exception types; ort_trainer decides on every failure itself.
            "ORTMODULE_FALLBACK_POLICY": "FALLBACK_DISABLE",
            "ORTMODULE_MEMORY_OPT_LEVEL": str(self.memory_optimization_level),
            "ORTMODULE_ENABLE_EMBEDDING_SPARSE_OPTIMIZER": str(int(self.sparsity_optimization)),
            "ORTMODULE_ENABLE_LABEL_SPARSE_OPTIMIZER": str(int(self.sparsity_optimization)),
        }


@contextlib.contextmanager
def _environment(values: dict):
    saved = {key: os.environ.get(key) for key in values}
    _set_environment(values)
    try:
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict):
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def wrap_with_ortmodule(model: torch.nn.Module, options: ORTModuleOptions) -> torch.nn.Module:
    """Wrap `model` in an ORTModule configured by `options`."""
    ort_module_cls = load_ortmodule()
    from onnxruntime.training.ortmodule import DebugOptions, LogLevel

    debug_options = DebugOptions(
        log_level=LogLevel[options.log_level.upper()],
        save_onnx=options.save_onnx,
        onnx_prefix=options.onnx_prefix,
        save_path=options.save_onnx_path,
    )
    with _environment(options.environment()):
        wrapped = ort_module_cls(model, debug_options)
    # ORTModule registered its export rules globally; they come back only for its own exports.
    _ort_symbolics(register=False, opset=_runtime_opset(wrapped))
    logging.getLogger("orttraining").addFilter(_drop_name_collision_warnings)
    return wrapped


def _runtime_opset(model) -> int:
    return model._torch_module._execution_manager(True)._runtime_options.onnx_opset_version


def _drop_name_collision_warnings(record: logging.LogRecord) -> bool:
    # ORTModule warns that every nn.Module's own methods (`to`, `train`, ...) collide with its own; they are
    # meant to, as ORTModule replaces them.
    return "collides with ORTModule's attribute name" not in record.getMessage()


def fused_adam_class():
    """ONNX Runtime's FusedAdam (CUDA only)."""
    load_ortmodule()
    from onnxruntime.training.optim import FusedAdam

    return FusedAdam


def is_ortmodule(model) -> bool:
    module = sys.modules.get("onnxruntime.training.ortmodule")
    return module is not None and isinstance(model, module.ORTModule)


@dataclass
class ORTModuleStatus:
    """What an ORTModule actually did: `backend` is "onnxruntime" once ORT built and ran the training graph."""

    backend: str
    reason: str = ""


def ortmodule_status(model) -> ORTModuleStatus:
    if not is_ortmodule(model):
        return ORTModuleStatus("pytorch", "the model is not wrapped in ORTModule")
    from onnxruntime.training.ortmodule._torch_module_ort import TorchModuleORT

    pending = model._fallback_manager._exception
    if pending is not None or not isinstance(model._torch_module, TorchModuleORT):
        return ORTModuleStatus("pytorch (ORT fell back)", str(pending).strip().splitlines()[0] if pending else "")
    if model._torch_module._execution_manager(True)._execution_agent is None:
        return ORTModuleStatus("onnxruntime (not run yet)")
    return ORTModuleStatus("onnxruntime")


def describe_failure(model: torch.nn.Module, error: BaseException) -> str:
    """A sentence saying why ORT could not train `model`, with the root cause."""
    return f"ONNX Runtime could not train {type(unwrap_ortmodule(model)).__name__}: {describe_error(error)}."


def describe_error(error: BaseException) -> str:
    """An exception's first line and the root cause below it, or where it was raised when it says nothing. ORT
    wraps the real error in exceptions of its own (`__cause__` / `__context__`), and copies its traceback into their
    text, whose last line names it: "error while exporting the PyTorch model to ONNX: <traceback>"."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    first = _lines(error)[0].rstrip(" :.") if _lines(error) else ""
    root = next(
        (
            _lines(inner)[-1 if "Traceback (most recent call last)" in str(inner) else 0]
            for inner in reversed(chain)
            if _lines(inner)
        ),
        "",
    ).rstrip(".")
    if not (first or root):
        frame = traceback.extract_tb(chain[-1].__traceback__)[-1]
        return f"{type(chain[-1]).__name__} in {Path(frame.filename).name}:{frame.name}"
    return first if root in first else f"{first}: {root}" if first else root


def _lines(error: BaseException) -> list:
    return [line.strip() for line in str(error).splitlines() if line.strip()]


def unwrap_ortmodule(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if is_ortmodule(model) else model
