"""What every head's ONNX Runtime counterpart does: inside `running(model)`, the model computes in its sessions."""

import contextlib
import functools
from pathlib import Path
from typing import Callable

import torch

from .export import export_key, reuse_or_export
from .quantization import RECIPE, on_cpu_only, quantize_dynamic_int8
from .session import ONNXModel, convert_to_fp16, session_target


def exported_sessions(
    model, graphs: tuple, directory: Path, fp16: bool, export: Callable[[], None], quantize: bool = False
) -> tuple[list, list]:
    """Sessions of the graphs `<name>.onnx` that `export()` writes into `directory` (reused while the weights and
    config are unchanged); fp16 when `fp16` and running on CUDA, inputs and outputs in their own types. With
    `quantize`, on the CPU, also their dynamic int8 versions (else an empty list)."""
    device, provider, fp16 = session_target(model, fp16)
    quantize = on_cpu_only(quantize, provider, type(model).__name__, "fp16" if fp16 else "fp32")
    key = export_key(model, graphs=list(graphs), provider=provider, fp16=fp16, quantize=quantize and RECIPE)

    def export_all() -> list:
        export()
        names = [convert_to_fp16(directory / f"{graph}.onnx") if fp16 else f"{graph}.onnx" for graph in graphs]
        return names + [quantize_dynamic_int8(directory / name) for name in names] if quantize else names

    names = reuse_or_export(directory, key, export_all)
    precision = "fp16" if fp16 else "fp32"
    sessions = [ONNXModel.open(directory / name, provider, device, precision) for name in names[: len(graphs)]]
    int8 = [ONNXModel.open(directory / name, provider, device, RECIPE) for name in names[len(graphs) :]]
    return sessions, int8


class InferenceModel:
    """A model's exported graphs in ONNX Runtime sessions. Inside `running(model)`, `model(...)` (and for generative
    models `model.generate(...)`) computes in them, so the Trainer's own prediction step, losses and generation run
    unchanged around ONNX Runtime."""

    sessions: tuple = ()
    runs = "Evaluation"  # what the sessions take over, for the log
    can_quantize = False  # whether `load(..., quantize=True)` builds int8 sessions
    reference = None  # the fp32 counterpart of int8 sessions

    @property
    def provider(self) -> str:
        return self.sessions[0].provider

    def description(self) -> str:
        """The log line saying where evaluation runs."""
        graphs = ", ".join(session.path.name for session in self.sessions)
        return (
            f"{self.runs} backend: ONNX Runtime on {self.provider} ({graphs} in {self.sessions[0].path.parent}, "
            f"optimisation and precision: {self.sessions[0].optimization})."
        )

    def forward(self, model: torch.nn.Module, **inputs):
        """The model's `forward`, computed in the sessions."""
        raise NotImplementedError

    def replacements(self, model: torch.nn.Module) -> dict:
        """The model's methods to replace while running: `forward`, with the model's signature, which `generate`
        checks its arguments against."""
        return {
            "forward": functools.wraps(model.forward)(lambda *args, **kwargs: self.forward(model, *args, **kwargs))
        }

    @contextlib.contextmanager
    def running(self, model: torch.nn.Module):
        """Inside, the model's own modules are not called."""
        replacements = self.replacements(model)
        saved = {name: model.__dict__[name] for name in replacements if name in model.__dict__}
        model.__dict__.update(replacements)
        try:
            yield
        finally:
            for name in replacements:
                del model.__dict__[name]
            model.__dict__.update(saved)
