"""Exporting a module to ONNX once, and reusing the export while the model is unchanged."""

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


OPSET = 17


class ONNXExportError(RuntimeError):
    """The model could not be exported to ONNX."""


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode without gradients, for exports; the model's own mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def export_module(module, inputs, input_names: list, output_names: list, dynamic_axes: dict, path: Path) -> None:
    """`torch.onnx.export` with the TorchScript exporter (the one ORT's transformer optimizer knows), or an
    error naming what could not be exported. `inputs` are positional (a tuple) or keyword (a dict)."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # The tracer warns of every Python value it records; the graphs are tested on other shapes than traced.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                args,
                str(path),
                kwargs=kwargs,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        name = type(getattr(module, "model", module)).__name__
        raise ONNXExportError(
            f"Could not export {name} to ONNX for `--inference_with_ort`: {first_line.rstrip('.')}. "
            "To fix: evaluate in PyTorch (drop `--inference_with_ort`)."
        ) from error


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of the weights and config, so an exported graph is reused only while it is current."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    config = getattr(model, "config", None)
    if config is not None:
        # problem_type is set by the first loss computed and does not change the graph.
        values = {key: value for key, value in config.to_dict().items() if key != "problem_type"}
        digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def export_key(model: torch.nn.Module, **settings) -> dict:
    """What an export depends on: weights, config, the versions that wrote it, and the caller's settings."""
    from .. import __version__

    return {
        "fingerprint": fingerprint(model),
        "opset": OPSET,
        "torch": torch.__version__,
        "ort_trainer": __version__,
    } | settings


def reuse_or_export(directory: Path, key: dict, export: Callable[[], list]) -> list:
    """The graph files recorded in `directory/model.json` if they were exported under `key` and are all there,
    else the files `export()` writes (then recorded)."""
    stamp_path = directory / "model.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    graphs = stamp.get("graphs")
    if stamp.get("key") != key or not graphs or not all((directory / graph).is_file() for graph in graphs):
        directory.mkdir(parents=True, exist_ok=True)
        stamp = {"key": key, "graphs": export()}
        stamp_path.write_text(json.dumps(stamp))
    return stamp["graphs"]


@dataclass
class GraphSpec:
    """One graph to export: the module, its sample inputs (positional), the graph's input and output names, and the
    names of their dynamic axes."""

    module: torch.nn.Module
    inputs: tuple
    input_names: list
    output_names: list
    dynamic_axes: dict

    def export(self, path: Path) -> None:
        export_module(self.module, self.inputs, self.input_names, self.output_names, self.dynamic_axes, path)
