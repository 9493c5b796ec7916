"""run_ner.py end to end on the shipped NER data: learning, ORT parity, label alignment, bad input."""

import functools
import json

import pytest

from ort_trainer import example_utils

from .example_scripts import EXAMPLES, common, data_files, int8_operators, load_script, run_script


EXAMPLE = EXAMPLES / "token-classification"
DATA = EXAMPLE / "data" / "ner"
MODEL_CONFIG = EXAMPLE / "demo" / "bert-mini.json"


def run_ner(monkeypatch, *args):
    run_script(monkeypatch, EXAMPLE / "run_ner.py", *args)


files = functools.partial(data_files, DATA)


def test_short_schedule_learns_and_ort_evaluation_equals_pytorch(monkeypatch, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="ort_trainer"):
        run_ner(
            monkeypatch,
            "--config_name",
            MODEL_CONFIG,
            "--train_tokenizer",
            *files("train", "validation", "test"),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--inference_with_ort",
            "--return_entity_level_metrics",
            "--num_train_epochs",
            "3",
            "--learning_rate",
            "1e-3",
            "--warmup_steps",
            "30",
            "--per_device_train_batch_size",
            "32",
            *common(out),
        )
    assert "Training backend: onnxruntime on cpu." in caplog.text
    assert "Evaluation backend: ONNX Runtime on CPUExecutionProvider" in caplog.text
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_f1"] >= 0.8, results
    for entity in ("PER", "ORG", "LOC", "MISC"):
        assert f"eval_{entity}_f1" in results

    # CoNLL layout: one `word tag` line per word of the test file, a blank line after each sentence.
    sentences = (out / "predictions.txt").read_text().split("\n\n")[:-1]
    test_rows = [json.loads(line) for line in (DATA / "test.json").read_text().splitlines()]
    assert len(sentences) == len(test_rows)
    for sentence, row in zip(sentences, test_rows):
        assert [line.split(" ")[0] for line in sentence.splitlines()] == row["tokens"]

    # The trained model evaluated in PyTorch and in ONNX Runtime: the same seqeval metrics, the same predictions.
    metrics, predictions = {}, {}
    for backend, flags in (("pytorch", []), ("ort", ["--inference_with_ort"])):
        run_ner(
            monkeypatch,
            "--model_name_or_path",
            out,
            *files("validation", "test"),
            "--do_eval",
            "--do_predict",
            "--use_ort",
            "False",
            "--return_entity_level_metrics",
            *flags,
            *common(tmp_path / backend),
        )
        metrics[backend] = json.loads((tmp_path / backend / "eval_results.json").read_text())
        predictions[backend] = (tmp_path / backend / "predictions.txt").read_text()
    assert predictions["ort"] == predictions["pytorch"]
    assert "eval_ort_setup_seconds" in metrics["ort"] and "eval_ort_setup_seconds" not in metrics["pytorch"]
    timings = ("runtime", "per_second", "preparation_time")
    for key, value in metrics["pytorch"].items():
        if key == "eval_loss":
            assert metrics["ort"][key] == pytest.approx(value, abs=1e-6)
        elif not any(timing in key for timing in timings):
            assert metrics["ort"][key] == value, key

    # In dynamic int8: F1 within a point of the fp32 graph's, measured beside it, on quantized operators.
    run_ner(
        monkeypatch,
        "--model_name_or_path",
        out,
        *files("validation"),
        "--do_eval",
        "--use_ort",
        "False",
        "--inference_with_ort",
        "--ort_quantization",
        "dynamic_int8",
        *common(tmp_path / "int8"),
    )
    int8 = json.loads((tmp_path / "int8" / "eval_results.json").read_text())
    assert int8["eval_fp32_f1"] == metrics["ort"]["eval_f1"]
    assert abs(int8["eval_f1"] - int8["eval_fp32_f1"]) <= 0.01
    assert int8["eval_int8_agreement"] >= 0.98
    (operators,) = int8_operators(tmp_path / "int8" / "onnx").values()
    assert operators.keys() >= {"MatMulInteger", "DynamicQuantizeLinear"}


def test_alignment_first_piece_or_all_pieces():
    align_labels = load_script(EXAMPLE / "run_ner.py").align_labels
    label_to_id = {"O": 0, "B-PER": 1, "I-PER": 2}
    b_to_i = [0, 2, 2]
    # [CLS] Jo ##rdan Smith [SEP]: "Jordan" in two pieces, "Smith" in one.
    word_ids = [None, 0, 0, 1, None]
    tags = ["B-PER", "I-PER"]
    assert align_labels(word_ids, tags, label_to_id, b_to_i, label_all_tokens=False) == [-100, 1, -100, 2, -100]
    assert align_labels(word_ids, tags, label_to_id, b_to_i, label_all_tokens=True) == [-100, 1, 2, 2, -100]


def test_words_cut_by_max_seq_length_are_reported_and_still_written(monkeypatch, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        run_ner(
            monkeypatch,
            "--config_name",
            MODEL_CONFIG,
            "--train_tokenizer",
            *files("train", "test"),
            "--max_train_samples",
            "64",
            "--max_steps",
            "2",
            "--do_train",
            "--do_predict",
            "--max_seq_length",
            "6",
            "--max_predict_samples",
            "20",
            *common(tmp_path / "out"),
        )
    assert (
        "words of the test data were cut off by `--max_seq_length 6`; they are tagged O in predictions." in caplog.text
    )
    sentences = (tmp_path / "out" / "predictions.txt").read_text().split("\n\n")[:-1]
    test_rows = [json.loads(line) for line in (DATA / "test.json").read_text().splitlines()][:20]
    assert [len(sentence.splitlines()) for sentence in sentences] == [len(row["tokens"]) for row in test_rows]
    long_row = next(index for index, row in enumerate(test_rows) if len(row["tokens"]) > 6)
    assert sentences[long_row].splitlines()[-1].endswith(" O")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def bad_cases(tmp_path):
    good = {"tokens": ["Anna", "lives", "in", "Rome"], "ner_tags": ["B-PER", "O", "O", "B-LOC"]}
    train = write_rows(tmp_path / "train.json", [good] * 4)
    unknown_tag = write_rows(tmp_path / "unknown.json", [good, {"tokens": ["Bob"], "ner_tags": ["B-XYZ"]}])
    mismatched = write_rows(
        tmp_path / "mismatched.json", [good, good, {"tokens": ["Bob", "ran"], "ner_tags": ["B-PER"]}]
    )
    no_tags = write_rows(tmp_path / "no_tags.json", [{"tokens": ["Bob"]}])
    empty = tmp_path / "empty.json"
    empty.write_text("")
    scratch = ["--config_name", MODEL_CONFIG, "--train_tokenizer", "--do_train"]
    return {
        "unknown tag": (
            [*scratch, "--train_file", train, "--validation_file", unknown_tag, "--do_eval"],
            "Row 1 of the validation data has tag 'B-XYZ', which the training labels (B-LOC, B-PER, O) do not have.",
        ),
        "mismatched lengths": (
            [*scratch, "--train_file", mismatched],
            "Row 2 of the train data has 2 words but 1 tags.",
        ),
        "missing column": (
            [*scratch, "--train_file", no_tags, "--label_column_name", "ner_tags"],
            "No label column `ner_tags` in the data (columns: tokens).",
        ),
        "empty file": ([*scratch, "--train_file", empty], f"`--train_file` {empty} is empty."),
        "no data": ([*scratch], "Give `--dataset_name`, or data files with `--train_file`/`--validation_file`."),
    }


@pytest.mark.parametrize("case", ["unknown tag", "mismatched lengths", "missing column", "empty file", "no data"])
def test_bad_input_one_line_nonzero_exit_output_dir_untouched(case, monkeypatch, tmp_path, capsys):
    args, message = bad_cases(tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        run_ner(monkeypatch, *args, *common(tmp_path / "out"))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"run_ner.py: error: {message}"
    assert not (tmp_path / "out").exists()


def test_slow_tokenizer_is_refused(monkeypatch, tmp_path, capsys):
    train_tokenizer = example_utils.load_tokenizer

    def slow_tokenizer(*args, **kwargs):
        tokenizer = train_tokenizer(*args, **kwargs)
        monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
        return tokenizer

    monkeypatch.setattr(example_utils, "load_tokenizer", slow_tokenizer)
    with pytest.raises(SystemExit):
        run_ner(
            monkeypatch,
            "--config_name",
            MODEL_CONFIG,
            "--train_tokenizer",
            *files("train"),
            "--do_train",
            *common(tmp_path / "out"),
        )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "run_ner.py: error: run_ner.py aligns labels with a fast tokenizer's word ids, and TokenizersBackend "
        "is slow. To fix: use a model that has a fast tokenizer (tokenizer.json)."
    )


def test_padded_to_max_length_beyond_the_positions_trains_in_ort_as_in_pytorch(monkeypatch, tmp_path, caplog):
    """`--pad_to_max_length` with 500 asked of a model of 64 positions: capped to 64 with a warning, and ORT trains
    the padded batches (trimmed of their all-padding columns) to PyTorch's losses."""
    config = json.loads(MODEL_CONFIG.read_text()) | {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (tmp_path / "bert.json").write_text(json.dumps(config))
    losses = {}
    for backend in ("ort", "pytorch"):
        with caplog.at_level("INFO"):
            run_ner(
                monkeypatch,
                "--config_name",
                tmp_path / "bert.json",
                "--train_tokenizer",
                *files("train"),
                "--do_train",
                "--max_train_samples",
                "64",
                "--max_steps",
                "3",
                "--logging_steps",
                "1",
                "--pad_to_max_length",
                "--max_seq_length",
                "500",
                "--use_ort",
                str(backend == "ort"),
                *common(tmp_path / backend),
            )
        history = json.loads((tmp_path / backend / "trainer_state.json").read_text())["log_history"]
        losses[backend] = [entry["loss"] for entry in history if "loss" in entry]
    assert "`--max_seq_length 500` is more than the model takes (64 tokens): using 64." in caplog.text
    assert "Training backend: onnxruntime on cpu." in caplog.text
    assert losses["ort"] == pytest.approx(losses["pytorch"], abs=1e-4) and len(losses["ort"]) == 3
