"""The benchmark command on a tiny model: every file written, every figure present and positive, backends named."""

import json

from ort_trainer import benchmark


def test_benchmark_writes_tables_json_and_chart(tmp_path):
    benchmark.main(["--model", "tiny", "--max_steps", "3", "--train_samples", "48", "--eval_samples", "40",
                    "--output_dir", str(tmp_path), "--script_args", "--ort_fallback error"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    pytorch, ort = report["runs"]["PyTorch"], report["runs"]["ONNX Runtime"]
    assert pytorch["training_backend"] == "PyTorch on cpu (`--use_ort False`)"
    assert ort["training_backend"] == "onnxruntime on cpu"
    assert (pytorch["evaluation_backend"], ort["evaluation_backend"]) == ("PyTorch", "ONNX Runtime on CPUExecutionProvider")
    for run in (pytorch, ort):
        for figure in ("train_runtime", "train_samples_per_second", "eval_samples_per_second", "eval_accuracy"):
            assert run["results"][figure] > 0, figure
        assert run["first_step_seconds"] > 0 and run["peak_memory_mb"] > 0 and len(run["losses"]) == 3
        assert run["eval_steady_samples_per_second"] > 0
    assert ort["results"]["eval_ort_setup_seconds"] > 0 and "eval_ort_setup_seconds" not in pytorch["results"]
    assert report["gain"]["max_loss_difference"] < 1e-4
    table = (tmp_path / "benchmark.md").read_text()
    assert "| tiny | ONNX Runtime (onnxruntime on cpu) |" in table and "Train throughput gain" in table
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_of_translation_names_the_generation_backend(tmp_path):
    benchmark.main(["--task", "translation", "--model", "t5-tiny", "--max_steps", "2", "--train_samples", "32",
                    "--eval_samples", "16", "--seq_length", "24", "--output_dir", str(tmp_path),
                    "--script_args", "--ort_fallback error"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    pytorch, ort = report["runs"]["PyTorch"], report["runs"]["ONNX Runtime"]
    assert (pytorch["training_backend"], ort["training_backend"]) == ("PyTorch on cpu (`--use_ort False`)", "onnxruntime on cpu")
    assert (pytorch["evaluation_backend"], ort["evaluation_backend"]) == ("PyTorch", "ONNX Runtime on CPUExecutionProvider")
    for run in (pytorch, ort):
        assert run["results"]["eval_gen_len"] > 0 and run["results"]["eval_bleu"] >= 0
        assert run["eval_steady_samples_per_second"] > 0 and len(run["losses"]) == 2
    # Dropout off: the same losses, and the same generated translations, so the same BLEU.
    assert report["gain"]["max_loss_difference"] < 1e-4
    assert ort["results"]["eval_bleu"] == pytorch["results"]["eval_bleu"]
    assert "| t5-tiny | ONNX Runtime (onnxruntime on cpu) |" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_against_a_plain_transformers_trainer(tmp_path):
    benchmark.main(["--model", "tiny", "--compare", "trainer", "--max_steps", "3", "--train_samples", "48",
                    "--eval_samples", "40", "--output_dir", str(tmp_path)])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    plain, ours = report["runs"]["transformers.Trainer"], report["runs"]["ORTTrainer"]
    assert (plain["training_backend"], ours["training_backend"]) == (
        "PyTorch, transformers.Trainer", "PyTorch on cpu (`--use_ort False`)"
    )
    assert (plain["evaluation_backend"], ours["evaluation_backend"]) == ("PyTorch", "ONNX Runtime on CPUExecutionProvider")
    assert plain["first_step_seconds"] is None and ours["first_step_seconds"] > 0
    # The same PyTorch training: the same losses, to the last bit.
    assert plain["losses"] == ours["losses"] and len(ours["losses"]) == 3
    assert ours["results"]["eval_accuracy"] == plain["results"]["eval_accuracy"]
    assert "| tiny | transformers.Trainer (PyTorch, transformers.Trainer) | " in (tmp_path / "benchmark.md").read_text()
