"""The benchmark command on a tiny model: every file written, every figure present and positive, backends named."""

import json

from ort_trainer import benchmark


def test_benchmark_compares_on_the_same_tokens(tmp_path):
    benchmark.main(
        [
            "--model",
            "tiny",
            "--max_steps",
            "3",
            "--train_samples",
            "48",
            "--eval_samples",
            "40",
            "--output_dir",
            str(tmp_path),
            "--script_args",
            "--ort_fallback error",
        ]
    )
    report = json.loads((tmp_path / "benchmark.json").read_text())
    plain, pytorch, ort = (report["runs"][row] for row in ("transformers.Trainer", "PyTorch", "ONNX Runtime"))
    assert plain["training_backend"] == "PyTorch, transformers.Trainer"
    assert pytorch["training_backend"] == "PyTorch on cpu (`--use_ort False`)"
    assert ort["training_backend"] == "onnxruntime on cpu"
    assert [run["evaluation_backend"] for run in (plain, pytorch, ort)] == [
        "PyTorch",
        "PyTorch",
        "ONNX Runtime on CPUExecutionProvider",
    ]
    # The ONNX Runtime row and its PyTorch baseline computed the same tokens; the plain Trainer every padded column.
    for split in ("train", "eval"):
        computed = [run["results"][f"{split}_computed_tokens_per_sample"] for run in (plain, pytorch, ort)]
        real = {run["results"][f"{split}_real_tokens_per_sample"] for run in (plain, pytorch, ort)}
        assert computed[1] == computed[2] < computed[0] == 128 and len(real) == 1
    for run in (plain, pytorch, ort):
        for figure in ("train_runtime", "train_samples_per_second", "eval_samples_per_second", "eval_accuracy"):
            assert run["results"][figure] > 0, figure
        assert run["peak_memory_mb"] > 0 and len(run["losses"]) == 3
        assert run["train_steady_samples_per_second"] > 0 and run["eval_steady_samples_per_second"] > 0
        assert run["tflops"]["train"] > 0 and run["tflops"]["eval"] > 0
    assert pytorch["first_step_seconds"] > 0 and ort["first_step_seconds"] > 0 and plain["first_step_seconds"] is None
    assert ort["results"]["eval_ort_setup_seconds"] > 0 and "eval_ort_setup_seconds" not in pytorch["results"]
    same_tokens = report["ratios"]["ONNX Runtime / PyTorch"]
    assert same_tokens["same_tokens"] and same_tokens["max_loss_difference"] < 1e-4 and same_tokens["train"] > 0
    assert not report["ratios"]["padding trimming: PyTorch / transformers.Trainer"]["same_tokens"]
    # Trimming does not change what is learnt: the plain Trainer's losses too.
    assert report["ratios"]["padding trimming: PyTorch / transformers.Trainer"]["max_loss_difference"] < 1e-4
    table = (tmp_path / "benchmark.md").read_text()
    assert (
        "| tiny | ONNX Runtime (onnxruntime on cpu) |" in table and "| tiny | ONNX Runtime / PyTorch | yes |" in table
    )
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_of_translation_names_the_generation_backend(tmp_path):
    benchmark.main(
        [
            "--task",
            "translation",
            "--model",
            "t5-tiny",
            "--rows",
            "pytorch",
            "ort",
            "--max_steps",
            "2",
            "--train_samples",
            "32",
            "--eval_samples",
            "16",
            "--seq_length",
            "24",
            "--output_dir",
            str(tmp_path),
            "--script_args",
            "--ort_fallback error",
        ]
    )
    report = json.loads((tmp_path / "benchmark.json").read_text())
    pytorch, ort = report["runs"]["PyTorch"], report["runs"]["ONNX Runtime"]
    assert (pytorch["training_backend"], ort["training_backend"]) == (
        "PyTorch on cpu (`--use_ort False`)",
        "onnxruntime on cpu",
    )
    assert (pytorch["evaluation_backend"], ort["evaluation_backend"]) == (
        "PyTorch",
        "ONNX Runtime on CPUExecutionProvider",
    )
    for run in (pytorch, ort):
        assert run["results"]["eval_gen_len"] > 0 and run["results"]["eval_bleu"] >= 0
        assert run["eval_steady_samples_per_second"] > 0 and len(run["losses"]) == 2
    # Dropout off: the same losses, and the same generated translations, so the same BLEU.
    assert report["ratios"]["ONNX Runtime / PyTorch"]["max_loss_difference"] < 1e-4
    assert ort["results"]["eval_bleu"] == pytorch["results"]["eval_bleu"]
    assert "| t5-tiny | ONNX Runtime (onnxruntime on cpu) |" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_int8_row_evaluates_the_pytorch_row_model_in_int8(tmp_path):
    benchmark.main(
        [
            "--model",
            "tiny",
            "--rows",
            "pytorch",
            "int8",
            "--max_steps",
            "3",
            "--train_samples",
            "48",
            "--eval_samples",
            "40",
            "--output_dir",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "benchmark.json").read_text())
    pytorch, int8 = report["runs"]["PyTorch"], report["runs"]["ONNX Runtime int8"]
    assert int8["evaluation_backend"] == "ONNX Runtime on CPUExecutionProvider"
    assert pytorch["losses"] == int8["losses"]  # both trained in PyTorch: the same weights evaluated
    assert int8["results"]["eval_computed_tokens_per_sample"] == pytorch["results"]["eval_computed_tokens_per_sample"]
    assert report["ratios"]["ONNX Runtime int8 / PyTorch fp32"]["same_tokens"]
