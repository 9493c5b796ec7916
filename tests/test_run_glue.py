"""run_glue.py end to end on the shipped sentiment data, and its answers to bad input."""

import functools
import json
from pathlib import Path

import pytest

from .example_scripts import EXAMPLES, common, data_files, int8_operators, run_script
from .test_example_utils import snapshot
from .tiny_models import tiny_model


DATA = EXAMPLES / "text-classification" / "data" / "sentiment"
MODEL_CONFIG = EXAMPLES / "text-classification" / "demo" / "bert-mini.json"


def run_glue(monkeypatch, *args):
    run_script(monkeypatch, EXAMPLES / "text-classification" / "run_glue.py", *args)


files = functools.partial(data_files, DATA, suffix="csv")


def test_demo_schedule_learns_with_ort_training_and_ort_evaluation(monkeypatch, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="ort_trainer"):
        run_glue(
            monkeypatch,
            "--config_name",
            MODEL_CONFIG,
            "--train_tokenizer",
            *files("train", "validation", "test"),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--inference_with_ort",
            "--max_seq_length",
            "48",
            "--num_train_epochs",
            "10",
            "--learning_rate",
            "1e-3",
            "--warmup_steps",
            "50",
            "--per_device_train_batch_size",
            "32",
            *common(out),
        )
    assert "Training backend: onnxruntime on cpu." in caplog.text
    assert "Evaluation backend: ONNX Runtime on CPUExecutionProvider" in caplog.text
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_accuracy"] >= 0.75  # a bag of words scores 0.52 on this split, word bigrams 0.62
    for name in ("train_results.json", "eval_results.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    predictions = (out / "predict_results_dataset.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 601
    assert {line.split("\t")[1] for line in predictions[1:]} == {"0", "1"}

    # The trained model evaluated again, in PyTorch and in ONNX Runtime: the same metrics.
    metrics = {}
    for backend, flags in (("pytorch", []), ("ort", ["--inference_with_ort"])):
        run_glue(
            monkeypatch,
            "--model_name_or_path",
            out,
            *files("validation"),
            "--do_eval",
            "--use_ort",
            "False",
            "--max_seq_length",
            "48",
            *flags,
            *common(tmp_path / backend),
        )
        metrics[backend] = json.loads((tmp_path / backend / "eval_results.json").read_text())
    assert metrics["ort"]["eval_accuracy"] == metrics["pytorch"]["eval_accuracy"] == results["eval_accuracy"]
    assert metrics["ort"]["eval_loss"] == pytest.approx(metrics["pytorch"]["eval_loss"], abs=1e-5)

    # In dynamic int8: the accuracy within a point of the fp32 graph's, measured beside it, on quantized operators.
    run_glue(
        monkeypatch,
        "--model_name_or_path",
        out,
        *files("validation"),
        "--do_eval",
        "--use_ort",
        "False",
        "--max_seq_length",
        "48",
        "--inference_with_ort",
        "--ort_quantization",
        "dynamic_int8",
        *common(tmp_path / "int8"),
    )
    int8 = json.loads((tmp_path / "int8" / "eval_results.json").read_text())
    assert int8["eval_fp32_accuracy"] == metrics["ort"]["eval_accuracy"]
    assert abs(int8["eval_accuracy"] - int8["eval_fp32_accuracy"]) <= 0.01
    assert int8["eval_int8_agreement"] >= 0.98
    (operators,) = int8_operators(tmp_path / "int8" / "onnx").values()
    assert operators.keys() >= {"MatMulInteger", "DynamicQuantizeLinear"}


def write(path, text):
    path.write_text(text)
    return path


def bad_input_cases(tmp_path):
    no_label = write(tmp_path / "no_label.csv", "sentence\nthe film was good\n")
    only_label = write(tmp_path / "only_label.csv", "label\n1\n0\n")
    unseen = write(tmp_path / "unseen.csv", "sentence,label\nthe film was good,1\nthe film was bad,7\n")
    empty = write(tmp_path / "empty.csv", "")
    fnet = write(
        tmp_path / "fnet.json",
        json.dumps(
            {
                "model_type": "fnet",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            }
        ),
    )
    empty_label = write(tmp_path / "empty_label.csv", "sentence,label\nthe film was good,1\nthe film was bad,\n")
    empty_text = write(tmp_path / "empty_text.csv", "sentence,label\nthe film was good,1\n,0\n")
    object_labels = write(tmp_path / "object_labels.json", '{"sentence": "a good film", "label": {"stars": 5}}\n')
    unseen_validation = write(tmp_path / "unseen_validation.csv", "sentence,label\nthe film was good,1\na film,9\n")
    scratch = ["--config_name", MODEL_CONFIG, "--train_tokenizer"]
    return {
        "empty label cell": (
            [*scratch, "--train_file", empty_label, "--do_train"],
            "Row 2 of the train data has no `label`. To fix: fill in that cell, or remove the row.",
        ),
        "empty text cell": (
            [*scratch, "--train_file", empty_text, "--do_train"],
            "Row 2 of the train data has no `sentence`. To fix: fill in that cell, or remove the row.",
        ),
        "labels as objects": (
            [*scratch, "--train_file", object_labels, "--do_train"],
            "The `label` column of the train data holds dict values, not single values. To fix: give one string or "
            "number per row.",
        ),
        "unseen validation labels": (
            [*scratch, *files("train"), "--validation_file", unseen_validation, "--do_train", "--do_eval"],
            "`--validation_file` has labels never seen in training: 9.",
        ),
        "pretrained model with a new tokenizer": (
            ["--model_name_or_path", "some-model", "--train_tokenizer", *files("train"), "--do_train"],
            "`--train_tokenizer` builds a new vocabulary, which the embeddings of `--model_name_or_path` some-model "
            "do not know. To fix: drop `--train_tokenizer` (or `--model_name_or_path` to train a new model with "
            "`--config_name`).",
        ),
        "no training samples": (
            [*scratch, *files("train"), "--do_train", "--max_train_samples", "0"],
            "`--max_train_samples` must be 1 or more, got 0. To fix: pass a positive `--max_train_samples`.",
        ),
        "gradient accumulation 0": (
            [*scratch, *files("train"), "--do_train", "--gradient_accumulation_steps", "0"],
            "`--gradient_accumulation_steps` must be 1 or more, got 0. To fix: pass a positive "
            "`--gradient_accumulation_steps`.",
        ),
        "options file with flags": (
            [EXAMPLES / "text-classification" / "demo" / "sentiment.json", "--max_steps", "2"],
            f"An options file must come alone, and {EXAMPLES / 'text-classification' / 'demo' / 'sentiment.json'} "
            f"came with --max_steps 2 --output_dir {tmp_path / 'out'} --report_to none --use_cpu --seed 42 "
            "--ort_fallback error --disable_tqdm True --save_strategy no. To fix: put those options into the file, or "
            "give every option on the command line.",
        ),
        "sequence length 0": (
            [*scratch, *files("train"), "--do_train", "--max_seq_length", "0"],
            "`--max_seq_length` must be 1 or more, got 0. To fix: pass a positive `--max_seq_length`.",
        ),
        "unknown task": (
            ["--model_name_or_path", "x", "--task_name", "sst3", "--do_train"],
            "Unknown `--task_name` sst3: choose one of cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb, wnli.",
        ),
        "task and files": (
            ["--model_name_or_path", "x", "--task_name", "sst2", *files("train")],
            "Give either `--task_name` or data files (`--train_file` ...), not both.",
        ),
        "no data": (
            ["--model_name_or_path", "x", "--do_train"],
            "Give a GLUE `--task_name`, or data files with `--train_file`/`--validation_file`.",
        ),
        "missing file": (
            [*scratch, "--train_file", tmp_path / "nope.csv", "--do_train"],
            f"`--train_file` {tmp_path / 'nope.csv'} does not exist or is not a file.",
        ),
        "empty file": ([*scratch, "--train_file", empty, "--do_train"], f"`--train_file` {empty} is empty."),
        "no label column": (
            [*scratch, "--train_file", no_label, "--do_train"],
            "The train data has no `label` column (columns: sentence).",
        ),
        "no text column": (
            [*scratch, "--train_file", only_label, "--do_train"],
            "No text column found: the data has only label.",
        ),
        "unseen test labels": (
            [*scratch, *files("train"), "--test_file", unseen, "--do_train", "--do_predict"],
            "`--test_file` has labels never seen in training: 7.",
        ),
        "not exportable": (
            [
                "--config_name",
                fnet,
                "--train_tokenizer",
                *files("validation"),
                "--do_eval",
                "--max_seq_length",
                "48",
                "--use_ort",
                "False",
                "--inference_with_ort",
            ],
            "Could not export FNetForSequenceClassification to ONNX for `--inference_with_ort`: Exporting the "
            "operator 'aten::fft_fftn' to ONNX opset version 17 is not supported. To fix: evaluate in PyTorch (drop "
            "`--inference_with_ort`).",
        ),
        "fp16 on cpu": (
            [*scratch, *files("train"), "--do_train", "--fp16"],
            "`--fp16` needs a GPU, and this run is on CPU. To fix: drop `--fp16`, or use `--bf16 --use_cpu`.",
        ),
        "bf16 with ort on cpu": (
            [*scratch, *files("train"), "--do_train", "--bf16"],
            "`--bf16` with ONNX Runtime training needs a GPU: ONNX Runtime's CPU build has no bf16 kernels. To fix: "
            "drop `--bf16`, or train in bf16 with PyTorch (`--use_ort False`).",
        ),
        "int8 without ort inference": (
            [*scratch, *files("train"), "--do_train", "--ort_quantization", "dynamic_int8"],
            "`--ort_quantization dynamic_int8` quantizes the ONNX Runtime evaluation graph, but "
            "`--inference_with_ort` is off. To fix: add `--inference_with_ort`, or drop `--ort_quantization`.",
        ),
        "fused adam on cpu": (
            [*scratch, *files("train"), "--do_train", "--optim", "adamw_ort_fused"],
            "`--optim adamw_ort_fused` runs only on CUDA, but this run uses cpu. To fix: use `--optim adamw_torch` on "
            "CPU.",
        ),
    }


@pytest.mark.parametrize("case", list(bad_input_cases(Path("/tmp"))))
def test_bad_input_one_line_nonzero_exit_output_dir_untouched(case, monkeypatch, tmp_path, capsys):
    args, message = bad_input_cases(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_glue(monkeypatch, *args, *common(out))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"run_glue.py: error: {message}"
    assert not out.exists()


def test_non_empty_output_dir_is_refused_and_kept(monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        run_glue(
            monkeypatch,
            "--config_name",
            MODEL_CONFIG,
            "--train_tokenizer",
            *files("train"),
            "--do_train",
            *common(out),
        )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"run_glue.py: error: Output directory ({out}) already exists and is not empty. "
        "To fix: pass `--overwrite_output_dir`, or choose another `--output_dir`."
    )
    assert [path.name for path in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_ortmodule_without_the_training_build_is_named_with_the_fix(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("ort_trainer.training_args.is_onnxruntime_training_available", lambda: False)
    monkeypatch.setattr("ort_trainer.training_args.onnxruntime_distribution", lambda: "onnxruntime")
    with pytest.raises(SystemExit):
        run_glue(
            monkeypatch,
            "--config_name",
            MODEL_CONFIG,
            "--train_tokenizer",
            *files("train"),
            "--do_train",
            "--ort_backend",
            "ortmodule",
            *common(tmp_path / "out"),
        )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "run_glue.py: error: `--ort_backend ortmodule` needs onnxruntime-training, not onnxruntime. To fix: pip "
        "install 'ort_trainer[training-cpu]' (CPU) or 'ort_trainer[training-gpu]' (CUDA 11.8, Python <= 3.11), or "
        "pass `--ort_backend compile`."
    )
    assert not (tmp_path / "out").exists()


def fake_glue(task):
    """A few rows in the layout of the Hub's GLUE task (the Hub is not reachable from the tests)."""
    import datasets

    columns = {
        "cola": ("sentence",),
        "stsb": ("sentence1", "sentence2"),
        "mrpc": ("sentence1", "sentence2"),
        "mnli": ("premise", "hypothesis"),
    }[task]
    names = {
        "cola": ["unacceptable", "acceptable"],
        "mrpc": ["not_equivalent", "equivalent"],
        "mnli": ["entailment", "neutral", "contradiction"],
    }.get(task)
    label = datasets.Value("float32") if task == "stsb" else datasets.ClassLabel(names=names)
    features = datasets.Features(
        {**{column: datasets.Value("string") for column in columns}, "label": label, "idx": datasets.Value("int32")}
    )
    words = "the film was good bad not great boring and but although it".split()

    def split(size, seed, test=False):
        import random

        rng = random.Random(seed)
        rows = {column: [" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(size)] for column in columns}
        if task == "stsb":
            rows["label"] = [-1.0 if test else rng.uniform(0, 5) for _ in range(size)]
        else:
            rows["label"] = [-1 if test else rng.randrange(len(names)) for _ in range(size)]
        rows["idx"] = list(range(size))
        return datasets.Dataset.from_dict(rows, features=features)

    suffixes = ["_matched", "_mismatched"] if task == "mnli" else [""]
    splits = {"train": split(40, 0)}
    for index, suffix in enumerate(suffixes):
        splits[f"validation{suffix}"] = split(21, 1 + index)
        splits[f"test{suffix}"] = split(11, 3 + index, test=True)
    return datasets.DatasetDict(splits)


@pytest.mark.parametrize(
    "task, metrics",
    [
        ("cola", ["eval_matthews_correlation"]),
        ("stsb", ["eval_pearson", "eval_spearmanr"]),
        ("mrpc", ["eval_accuracy", "eval_f1"]),
        ("mnli", ["eval_accuracy", "eval_accuracy_mm"]),
    ],
)
def test_glue_tasks_metrics_and_predictions_with_dynamic_padding(task, metrics, monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, **kwargs: fake_glue(config))
    task_args = [
        "--task_name",
        task,
        "--do_eval",
        "--do_predict",
        "--pad_to_max_length",
        "False",
        "--use_ort",
        "False",
        "--per_device_eval_batch_size",
        "8",
    ]
    run_glue(
        monkeypatch,
        "--config_name",
        MODEL_CONFIG,
        "--train_tokenizer",
        "--do_train",
        "--max_steps",
        "3",
        *task_args,
        *common(tmp_path / "pytorch"),
    )
    # The trained model again, evaluated and predicted in ONNX Runtime (batches of varying length, a partial last one).
    run_glue(
        monkeypatch,
        "--model_name_or_path",
        tmp_path / "pytorch",
        "--inference_with_ort",
        *task_args,
        *common(tmp_path / "ort"),
    )
    results = {
        backend: json.loads((tmp_path / backend / "eval_results.json").read_text()) for backend in ("pytorch", "ort")
    }
    # The ORT run really evaluated in an InferenceSession: it timed its setup and left its exported graph.
    assert results["ort"]["eval_ort_setup_seconds"] > 0 and "eval_ort_setup_seconds" not in results["pytorch"]
    assert (tmp_path / "ort" / "onnx" / "model.json").exists()
    for suffix in ["", "_mm"] if task == "mnli" else [""]:
        name = f"predict_results_{task}{suffix}.txt"
        pytorch_lines, ort_lines = (
            (tmp_path / backend / name).read_text().splitlines() for backend in ("pytorch", "ort")
        )
        assert len(ort_lines) == 12 and ort_lines[0] == "index\tprediction"
        if task != "stsb":
            assert ort_lines == pytorch_lines
    for metric in metrics:
        if task == "stsb":  # correlations of float predictions that differ by float rounding (~1e-6)
            assert results["ort"][metric] == pytest.approx(results["pytorch"][metric], abs=1e-4), metric
        else:
            assert results["ort"][metric] == results["pytorch"][metric], metric


def bad_input_into_existing(monkeypatch, capsys, out, *args) -> str:
    """Run with bad input into `out`, which exists: exit 1, one error line, `out` byte for byte as it was."""
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        run_glue(monkeypatch, *args, *common(out))
    assert exit_info.value.code == 1
    assert snapshot(out) == before
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_output_path_that_is_a_file_is_refused_before_work(monkeypatch, tmp_path, capsys):
    out = write(tmp_path / "results", "a file of mine")
    error = bad_input_into_existing(
        monkeypatch,
        capsys,
        tmp_path,
        "--config_name",
        MODEL_CONFIG,
        "--train_tokenizer",
        *files("train"),
        "--do_train",
        "--output_dir",
        out,
    )
    assert error == f"run_glue.py: error: `--output_dir` {out} is a file. To fix: give the path of a folder."


def test_output_dir_that_cannot_be_written_is_refused_before_work(monkeypatch, tmp_path, capsys):
    """The tests run as root, which a read-only mode does not stop: the folder's refusal is simulated."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    write(out / "notes.txt", "mine")
    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).startswith(str(out)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_open)
    error = bad_input_into_existing(
        monkeypatch,
        capsys,
        out,
        "--config_name",
        MODEL_CONFIG,
        "--train_tokenizer",
        *files("train"),
        "--do_train",
        "--overwrite_output_dir",
    )
    assert error == (
        f"run_glue.py: error: Cannot write to `--output_dir` {out}: Permission denied. To fix: choose a folder you "
        "can write to."
    )


def test_model_folder_without_tokenizer_files_is_refused(monkeypatch, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("bert").save_pretrained(model_dir)
    with pytest.raises(SystemExit):
        run_glue(
            monkeypatch, "--model_name_or_path", model_dir, *files("train"), "--do_train", *common(tmp_path / "out")
        )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"run_glue.py: error: The tokenizer of {model_dir} has no vocabulary, only its 5 special tokens: {model_dir} "
        "has no tokenizer files. To fix: pass `--tokenizer_name` with the model's tokenizer, or save it into that "
        "folder."
    )
    assert not (tmp_path / "out").exists()


def test_two_runs_into_one_new_folder_the_second_is_refused_the_first_keeps_its_results(monkeypatch, tmp_path, capsys):
    import os
    import subprocess
    import sys
    import time

    from ort_trainer.example_utils import LOCK_FILE

    out = tmp_path / "shared"
    command = [
        "--config_name",
        MODEL_CONFIG,
        "--train_tokenizer",
        *files("train", "validation"),
        "--do_train",
        "--do_eval",
        "--inference_with_ort",
        "--max_steps",
        "2",
        "--max_seq_length",
        "48",
        "--max_eval_samples",
        "64",
    ]
    first = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "text-classification" / "run_glue.py"),
            *map(str, command),
            *map(str, common(out)),
            "--seed",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
    )
    try:
        while not (out / LOCK_FILE).exists() and first.poll() is None:
            time.sleep(0.1)
        with pytest.raises(SystemExit) as exit_info:
            run_glue(monkeypatch, *command, *common(out), "--seed", "2")
        assert exit_info.value.code == 1
        assert (
            capsys.readouterr()
            .err.strip()
            .splitlines()[-1]
            .startswith(f"run_glue.py: error: `--output_dir` {out} is in use by process {first.pid} on ")
        )
    finally:
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    results = json.loads((out / "all_results.json").read_text())
    assert (
        results["eval_accuracy"] >= 0
        and (out / "onnx" / "model.json").exists()
        and (out / "model.safetensors").exists()
    )
    assert not (out / LOCK_FILE).exists()


def test_string_labels_train_as_their_ids_would(monkeypatch, tmp_path):
    """pos/neg labels, mapped to ids in sorted order as Hugging Face's run_glue does: the same run as 1/0."""
    import csv

    names = {"0": "neg", "1": "pos"}
    for split in ("train", "validation", "test"):
        with open(DATA / f"{split}.csv") as source, open(tmp_path / f"{split}.csv", "w", newline="") as target:
            writer = csv.writer(target)
            for index, row in enumerate(csv.reader(source)):
                writer.writerow(row if index == 0 else [row[0], names[row[1]]])
    runs = {}
    for name, folder in (("ids", DATA), ("names", tmp_path)):
        out = tmp_path / f"out-{name}"
        run_glue(
            monkeypatch,
            "--config_name",
            MODEL_CONFIG,
            "--train_tokenizer",
            *data_files(folder, "train", "validation", "test", suffix="csv"),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--max_steps",
            "4",
            "--max_seq_length",
            "48",
            "--max_eval_samples",
            "64",
            "--max_predict_samples",
            "16",
            *common(out),
        )
        runs[name] = (
            json.loads((out / "all_results.json").read_text()),
            (out / "predict_results_dataset.txt").read_text(),
        )
    (id_results, id_predictions), (name_results, name_predictions) = runs["ids"], runs["names"]
    assert name_results["eval_loss"] == pytest.approx(id_results["eval_loss"], abs=1e-6)
    assert name_results["eval_accuracy"] == id_results["eval_accuracy"]
    for name_line, id_line in zip(name_predictions.splitlines()[1:], id_predictions.splitlines()[1:], strict=True):
        assert name_line.split("\t")[1] == names[id_line.split("\t")[1]]


def test_max_seq_length_beyond_the_positions_is_capped_with_a_warning(monkeypatch, tmp_path, caplog):
    """A tokenizer that does not know the model's length (`model_max_length` unset), 200 asked, 64 positions: the
    run trains in ORT on 64 tokens, as Hugging Face's run_glue caps to the model's length."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    from ort_trainer.example_utils import train_wordpiece_tokenizer

    model_dir = tmp_path / "model"
    tiny_model("bert").save_pretrained(model_dir)  # max_position_embeddings 64
    tokenizer = train_wordpiece_tokenizer(["the film was good", "the film was bad"], 96, 64)
    tokenizer.model_max_length = VERY_LARGE_INTEGER
    tokenizer.save_pretrained(model_dir)
    long_text = write(
        tmp_path / "train.csv",
        "sentence,label\n" + "".join(f"{'the film was good ' * 30},{i % 2}\n" for i in range(16)),
    )
    with caplog.at_level("INFO"):
        run_glue(
            monkeypatch,
            "--model_name_or_path",
            model_dir,
            "--train_file",
            long_text,
            "--do_train",
            "--max_seq_length",
            "200",
            "--max_steps",
            "2",
            *common(tmp_path / "out"),
        )
    assert "`--max_seq_length 200` is more than the model takes (64 tokens): using 64." in caplog.text
    assert "Training backend: onnxruntime on cpu." in caplog.text


def test_test_file_without_labels_is_predicted_with_the_label_names(monkeypatch, tmp_path):
    train = write(tmp_path / "train.csv", "sentence,label\n" + "the film was good,pos\nthe film was bad,neg\n" * 8)
    test = write(tmp_path / "test.csv", "sentence\na good film\na bad film\n")
    run_glue(
        monkeypatch,
        "--config_name",
        MODEL_CONFIG,
        "--train_tokenizer",
        "--train_file",
        train,
        "--test_file",
        test,
        "--do_train",
        "--do_predict",
        "--max_steps",
        "2",
        "--max_seq_length",
        "16",
        *common(tmp_path / "out"),
    )
    lines = (tmp_path / "out" / "predict_results_dataset.txt").read_text().splitlines()
    assert len(lines) == 3 and {line.split("\t")[1] for line in lines[1:]} <= {"pos", "neg"}
