"""torchrun with ORT on CPU (gloo): DDP around the ORTModule, the same results as one process, two "nodes" on
one machine, and a rank that dies."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


SCRIPT = Path(__file__).resolve().parent / "distributed_train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, nproc=2, timeout=240, env=None):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(SCRIPT),
        *map(str, args),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def result(output_dir):
    return json.loads((Path(output_dir) / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 8, and two with batch 4 each: the same global batch and seed."""
    folder = tmp_path_factory.mktemp("distributed")
    single = subprocess.run([sys.executable, str(SCRIPT), str(folder / "single"), "8"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(folder / "double", 4)
    assert double.returncode == 0, double.stderr[-3000:]
    return folder, result(folder / "single"), result(folder / "double")


def assert_same_weights(first, second, atol):
    for name in first["weights"]:
        np.testing.assert_allclose(first["weights"][name], second["weights"][name], atol=atol, rtol=0)


def test_two_ranks_match_one_process(runs):
    _, single, double = runs
    assert (double["world_size"], double["wrapper"], double["inner"], double["backend"]) == (
        2,
        "DistributedDataParallel",
        "ORTModule",
        "onnxruntime",
    )
    # transformers logs the loss of models that take loss kwargs scaled by the number of processes.
    np.testing.assert_allclose(np.array(double["losses"]) / 2, single["losses"], atol=1e-4, rtol=0)
    assert_same_weights(double, single, atol=1e-4)
    # Evaluation (ONNX Runtime inference on each rank's shard, gathered) gives the single process's accuracy, and
    # the loss the Trainer reports for this evaluation in PyTorch (which transformers may scale by the number of
    # processes, as it does the training loss).
    assert double["metrics"]["eval_accuracy"] == single["metrics"]["eval_accuracy"]
    assert double["metrics"]["eval_loss"] == pytest.approx(double["pytorch_metrics"]["eval_loss"], abs=1e-5)
    assert single["metrics"]["eval_loss"] == pytest.approx(single["pytorch_metrics"]["eval_loss"], abs=1e-5)


def test_two_nodes_on_one_machine(runs):
    folder, _, double = runs
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=ort-test",
                str(SCRIPT),
                str(folder / "nodes"),
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=240)
        assert node.returncode == 0, stderr[-3000:]
    nodes_result = result(folder / "nodes")
    assert nodes_result["world_size"] == 2 and nodes_result["backend"] == "onnxruntime"
    np.testing.assert_allclose(nodes_result["losses"], double["losses"], atol=1e-6, rtol=0)
    assert_same_weights(nodes_result, double, atol=1e-6)


def test_a_dead_rank_stops_the_run_and_the_checkpoint_resumes(runs):
    folder, _, double = runs
    start = time.monotonic()
    killed = torchrun(folder / "killed", 4, 1, 6)  # rank 1 is killed at step 6; checkpoint-4 is already saved
    assert time.monotonic() - start < 180
    assert killed.returncode != 0
    # torchrun's report of the failed ranks (the killed one, or the survivor whose collective broke first).
    assert "ChildFailedError" in killed.stderr and "exitcode" in killed.stderr
    checkpoint = folder / "killed" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "trainer_state.json").exists()

    resumed = torchrun(folder / "killed", 4, 1, 0, checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(result(folder / "killed"), double, atol=1e-5)


def test_two_ranks_match_one_process_with_the_compile_backend(tmp_path):
    """DDP around the compiled model; the ranks share one graph cache, which the second run reads from."""
    environment = {**os.environ, "ORT_TRAINER_CACHE": str(tmp_path / "cache")}
    single = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "single"), "8", "1", "0", "", "compile"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(tmp_path / "double", 4, 1, 0, "", "compile", env=environment)
    assert double.returncode == 0, double.stderr[-3000:]
    single, double = result(tmp_path / "single"), result(tmp_path / "double")
    assert (double["world_size"], double["wrapper"], double["inner"], double["backend"]) == (
        2,
        "DistributedDataParallel",
        "OptimizedModule",
        "onnxruntime",
    )
    np.testing.assert_allclose(np.array(double["losses"]) / 2, single["losses"], atol=1e-4, rtol=0)
    assert_same_weights(double, single, atol=1e-4)
    assert single["graphs_exported"] > 0
    # Batch 4 per rank is a new shape; rank 0's second run in the same cache exports nothing.
    again = torchrun(tmp_path / "again", 4, 1, 0, "", "compile", env=environment)
    assert again.returncode == 0, again.stderr[-3000:]
    assert result(tmp_path / "again")["graphs_exported"] == 0 and result(tmp_path / "again")["graphs"] > 0


TRAIN_AND_DROP = """
import gc, sys, weakref
sys.path.insert(0, sys.argv[1])
from tiny_models import tiny_dataset, tiny_model
from ort_trainer import ORTTrainer, ORTTrainingArguments, compile_backend

def train(output_dir):
    args = ORTTrainingArguments(
        output_dir, ort_backend="compile", ort_fallback="error", use_cpu=True, max_steps=1, report_to=[]
    )
    trainer = ORTTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert", size=8))
    trainer.train()
    return weakref.ref(trainer)

trainer = train(sys.argv[2])
gc.collect()
print(compile_backend.stats.session_runs > 0, trainer() is None)
"""


def test_a_trainer_is_freed_once_the_script_drops_it(tmp_path):
    """Else its model and process group live until the interpreter exits, where gloo's worker threads can abort the
    process. A new process, as onnxruntime's first import there is what kept frames (see `ortmodule.py`)."""
    environment = {**os.environ, "ORT_TRAINER_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_DROP, str(SCRIPT.parent), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ran_in_onnxruntime, freed = run.stdout.split()[-2:]
    assert (ran_in_onnxruntime, freed) == ("True", "True")


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "translation"])
def test_example_scripts_run_unchanged_under_torchrun(task, tmp_path):
    root = SCRIPT.parents[1] / "examples" / task
    script, data, suffix, config, task_arguments = {
        "text-classification": (
            root / "run_glue.py",
            root / "data" / "sentiment",
            "csv",
            "bert-mini.json",
            ["--max_seq_length", "48"],
        ),
        "token-classification": (
            root / "run_ner.py",
            root / "data" / "ner",
            "json",
            "bert-mini.json",
            ["--max_seq_length", "48"],
        ),
        "translation": (
            root / "run_translation.py",
            root / "data" / "en-toy",
            "json",
            "t5-mini.json",
            ["--source_lang", "en", "--target_lang", "toy", "--predict_with_generate", "--max_source_length", "48"],
        ),
    }[task]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        "--config_name",
        root / "demo" / config,
        "--train_tokenizer",
        "--train_file",
        data / f"train.{suffix}",
        "--validation_file",
        data / f"validation.{suffix}",
        "--do_train",
        "--do_eval",
        "--inference_with_ort",
        "--max_train_samples",
        "256",
        "--max_eval_samples",
        "100",
        "--max_steps",
        "4",
        *task_arguments,
        "--output_dir",
        tmp_path,
        "--report_to",
        "none",
        "--use_cpu",
        "--ort_fallback",
        "error",
        "--save_strategy",
        "no",
    ]
    run = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "distributed: True" in run.stdout + run.stderr
    assert "Training backend: onnxruntime on cpu" in run.stdout + run.stderr
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["eval_samples"] == 100
    assert (tmp_path / "onnx" / "model.json").exists() and (tmp_path / "model.safetensors").exists()
    if task == "translation":  # generated in ONNX Runtime (rank 0 logs it), metrics over both ranks' predictions
        assert "Evaluation and generation backend: ONNX Runtime on CPUExecutionProvider" in run.stdout + run.stderr
        assert "eval_bleu" in results and "eval_gen_len" in results
