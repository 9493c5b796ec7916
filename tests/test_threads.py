"""PyTorch's idle OpenMP threads let go of the cores before ONNX Runtime computes on them."""

import os
import time
from pathlib import Path

import pytest
import torch
from onnx import TensorProto, helper, save

from ort_trainer import threads
from ort_trainer.inference.session import ONNXModel


pytestmark = [
    pytest.mark.skipif(threads._omp_pause_resource_all() is None, reason="PyTorch's OpenMP runtime has no pause"),
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc"),
    pytest.mark.skipif(torch.get_num_threads() < 2, reason="PyTorch runs one thread here: no OpenMP workers"),
]


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def after_a_parallel_torch_operation() -> int:
    torch.ones(4_000_000).exp_()  # large enough for PyTorch to run it on all its threads
    return thread_count()


def settled_thread_count(expected: int) -> int:
    """The thread count once it reaches `expected`, or after a second: exiting threads leave /proc shortly after."""
    deadline = time.monotonic() + 1
    while thread_count() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread_count()


def test_release_lets_the_openmp_workers_go():
    workers = torch.get_num_threads() - 1
    before = after_a_parallel_torch_operation()
    threads.release_torch_threads()
    assert settled_thread_count(before - workers) == before - workers
    assert after_a_parallel_torch_operation() == before  # PyTorch starts them again when it needs them


def test_a_cpu_session_run_releases_them_first(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "double.onnx")
    session = ONNXModel.open(tmp_path / "double.onnx", "CPUExecutionProvider", torch.device("cpu"))
    session({"x": torch.ones(3)})  # ONNX Runtime's own threads start with the first run
    workers = torch.get_num_threads() - 1
    before = after_a_parallel_torch_operation()
    assert torch.equal(session({"x": torch.arange(3.0)})["y"], torch.tensor([0.0, 2.0, 4.0]))
    assert settled_thread_count(before - workers) == before - workers
