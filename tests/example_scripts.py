"""Runs an example script's `main()` in this process, as its command line would, for the tests."""

import importlib.util
import json
import sys
from pathlib import Path

from ort_trainer import example_utils


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_script(monkeypatch, script: Path, *args):
    """Run `script` with `args` the way `python script args...` would: errors exit through `example_utils.run`."""
    monkeypatch.setattr(sys, "argv", [script.name, *map(str, args)])
    example_utils.run(load_script(script).main)


def data_files(folder: Path, *splits, suffix="json") -> list:
    """`--train_file folder/train.json ...`: the script arguments of the named splits' files."""
    return [arg for split in splits for arg in (f"--{split}_file", folder / f"{split}.{suffix}")]


def load_script(script: Path):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def common(output_dir):
    """Quiet, deterministic CPU runs that fail rather than fall back to PyTorch."""
    return [
        "--output_dir",
        output_dir,
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "42",
        "--ort_fallback",
        "error",
        "--disable_tqdm",
        "True",
        "--save_strategy",
        "no",
    ]


QUANTIZED_OPERATORS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention", "QGemm"}


def int8_operators(onnx_dir: Path) -> dict:
    """For each int8 graph of an `--ort_quantization dynamic_int8` run, how many quantized operators of each kind
    it has: {graph file: {operator: count}}."""
    import onnx

    graphs = json.loads((onnx_dir / "model.json").read_text())["graphs"]
    found = {}
    for int8 in (graph for graph in graphs if graph.endswith("_int8.onnx")):
        operators = [node.op_type for node in onnx.load(onnx_dir / int8).graph.node]
        found[int8] = {
            operator: operators.count(operator) for operator in QUANTIZED_OPERATORS if operator in operators
        }
    return found
