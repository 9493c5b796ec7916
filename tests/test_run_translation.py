"""run_translation.py end to end on the shipped English-Toy corpus: learning, ONNX Runtime generation equal to
PyTorch's, and bad input."""

import functools
import json

import pytest

from ort_trainer import example_utils

from .example_scripts import EXAMPLES, common, data_files, int8_operators, load_script, run_script
from .tiny_models import tiny_model


EXAMPLE = EXAMPLES / "translation"
DATA = EXAMPLE / "data" / "en-toy"
LANGUAGES = ["--source_lang", "en", "--target_lang", "toy"]


def run_translation(monkeypatch, *args):
    run_script(monkeypatch, EXAMPLE / "run_translation.py", *args)


files = functools.partial(data_files, DATA)


@pytest.mark.parametrize("architecture", ["t5", "bart"])
def test_short_schedule_learns_and_ort_generation_equals_pytorch(architecture, monkeypatch, tmp_path, caplog):
    trained = tmp_path / "trained"
    with caplog.at_level("INFO", logger="ort_trainer"):
        run_translation(
            monkeypatch,
            "--config_name",
            EXAMPLE / "demo" / f"{architecture}-mini.json",
            "--train_tokenizer",
            *LANGUAGES,
            *files("train", "validation"),
            "--max_source_length",
            "64",
            "--max_target_length",
            "64",
            "--do_train",
            "--do_eval",
            "--predict_with_generate",
            "--inference_with_ort",
            "--max_eval_samples",
            "200",
            "--num_train_epochs",
            "4",
            "--learning_rate",
            "2e-3",
            "--warmup_steps",
            "100",
            "--per_device_train_batch_size",
            "32",
            "--per_device_eval_batch_size",
            "64",
            *common(trained),
        )
    assert "Training backend: onnxruntime on cpu." in caplog.text
    assert "Evaluation and generation backend: ONNX Runtime on CPUExecutionProvider" in caplog.text
    results = json.loads((trained / "all_results.json").read_text())
    assert results["eval_bleu"] >= 30, results

    # In dynamic int8, all four graphs quantized: BLEU at most a point below the fp32 graphs', measured beside them
    # (on this briefly trained model it can also come out above).
    run_translation(
        monkeypatch,
        "--model_name_or_path",
        trained,
        *LANGUAGES,
        *files("validation"),
        "--do_eval",
        "--predict_with_generate",
        "--inference_with_ort",
        "--ort_quantization",
        "dynamic_int8",
        "--max_source_length",
        "64",
        "--max_target_length",
        "64",
        "--max_eval_samples",
        "200",
        "--per_device_eval_batch_size",
        "64",
        *common(tmp_path / "int8"),
    )
    int8 = json.loads((tmp_path / "int8" / "eval_results.json").read_text())
    assert int8["eval_fp32_bleu"] == pytest.approx(results["eval_bleu"], abs=1e-6)
    assert int8["eval_bleu"] >= int8["eval_fp32_bleu"] - 1.0, int8
    assert int8["eval_int8_agreement"] >= 0.8, int8
    graphs = int8_operators(tmp_path / "int8" / "onnx")
    assert len(graphs) == 4 and all(operators.keys() >= {"MatMulInteger"} for operators in graphs.values()), graphs

    # The trained model translates the test set in PyTorch and in ONNX Runtime: the same tokens, the same BLEU.
    for num_beams in ("1", "4"):
        outputs = {}
        for backend, flags in (("pytorch", []), ("ort", ["--inference_with_ort"])):
            out = tmp_path / f"{backend}-{num_beams}"
            run_translation(
                monkeypatch,
                "--model_name_or_path",
                trained,
                *LANGUAGES,
                *files("test"),
                "--do_predict",
                "--predict_with_generate",
                "--num_beams",
                num_beams,
                "--max_predict_samples",
                "120",
                "--per_device_eval_batch_size",
                "32",
                *flags,
                *common(out),
            )
            outputs[backend] = (
                (out / "generated_predictions.txt").read_text(),
                json.loads((out / "predict_results.json").read_text()),
            )
        (pytorch_text, pytorch_metrics), (ort_text, ort_metrics) = outputs["pytorch"], outputs["ort"]
        assert ort_text == pytorch_text
        assert len(ort_text.splitlines()) == 120
        assert ort_metrics["predict_bleu"] == pytorch_metrics["predict_bleu"] > 0
        assert ort_metrics["predict_gen_len"] == pytorch_metrics["predict_gen_len"]
        assert ort_metrics["predict_loss"] == pytest.approx(pytorch_metrics["predict_loss"], abs=1e-5)
        assert "predict_ort_setup_seconds" in ort_metrics and "predict_ort_setup_seconds" not in pytorch_metrics


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"translation": pair}) + "\n" for pair in pairs))
    return path


def bad_input(monkeypatch, tmp_path, capsys, *args):
    """Run with bad input into an output folder that holds a user's file: exit 1, the error as the last line of
    stderr (after the progress bars of `datasets`), the folder as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        run_translation(
            monkeypatch,
            "--config_name",
            EXAMPLE / "demo" / "t5-mini.json",
            "--train_tokenizer",
            *args,
            "--do_train",
            "--max_steps",
            "1",
            *common(out),
            "--overwrite_output_dir",
        )
    assert exit_info.value.code == 1
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    return capsys.readouterr().err.strip().splitlines()[-1]


GOOD = {"en": "The dog sees a cat .", "toy": "la hundo un kato vidas ."}


def test_a_line_without_a_language_is_named(monkeypatch, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.json", [GOOD, GOOD, {"en": "The cat runs ."}])
    error = bad_input(monkeypatch, tmp_path, capsys, *LANGUAGES, "--train_file", train)
    assert error == "run_translation.py: error: Line 3 of the train data has no 'toy' text."


def test_a_source_language_not_in_the_data(monkeypatch, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.json", [GOOD, GOOD])
    error = bad_input(
        monkeypatch, tmp_path, capsys, "--source_lang", "de", "--target_lang", "toy", "--train_file", train
    )
    assert (
        error == "run_translation.py: error: `--source_lang de` is not in the train data, whose languages are en, toy."
    )


def test_an_empty_file(monkeypatch, tmp_path, capsys):
    train = tmp_path / "train.json"
    train.write_text("")
    error = bad_input(monkeypatch, tmp_path, capsys, *LANGUAGES, "--train_file", train)
    assert error == f"run_translation.py: error: `--train_file` {train} is empty."


def test_a_missing_language_pair(monkeypatch, tmp_path, capsys):
    error = bad_input(monkeypatch, tmp_path, capsys, "--train_file", DATA / "train.json")
    assert error == "run_translation.py: error: Give the language pair: `--source_lang` and `--target_lang`."


def test_long_targets_are_truncated_and_counted(monkeypatch, tmp_path, caplog):
    long_pair = {"en": "The dog sees a cat today .", "toy": "hodiu la hundo un kato vidas . " * 4}
    train = write_jsonl(tmp_path / "train.json", [GOOD, long_pair, long_pair])
    with caplog.at_level("WARNING"):
        run_translation(
            monkeypatch,
            "--config_name",
            EXAMPLE / "demo" / "t5-mini.json",
            "--train_tokenizer",
            *LANGUAGES,
            "--train_file",
            train,
            "--max_target_length",
            "8",
            "--do_train",
            "--max_steps",
            "1",
            *common(tmp_path / "out"),
        )
    assert "2 target texts of the train data are longer than 8 tokens and were truncated." in caplog.text


def test_pretrained_t5_without_source_prefix_warns_as_upstream(monkeypatch, tmp_path, caplog):
    model_dir = tmp_path / "t5"
    model = tiny_model("t5")
    model.save_pretrained(model_dir)
    tokenizer = example_utils.train_wordpiece_tokenizer([GOOD["en"], GOOD["toy"]], 96, 64, seq2seq=True)
    tokenizer.save_pretrained(model_dir)
    train = write_jsonl(tmp_path / "train.json", [GOOD, GOOD])
    with caplog.at_level("WARNING"):
        run_translation(
            monkeypatch,
            "--model_name_or_path",
            model_dir,
            *LANGUAGES,
            "--train_file",
            train,
            "--do_train",
            "--max_steps",
            "1",
            *common(tmp_path / "out"),
        )
    assert (
        "You're running a t5 model but didn't provide a source prefix, which is expected, e.g. with "
        "`--source_prefix 'translate English to German: ' `"
    ) in caplog.text


def test_hub_data_is_checked_by_its_declared_languages():
    from datasets import Dataset, DatasetDict, Features, Translation

    check_languages = load_script(EXAMPLE / "run_translation.py").check_languages
    features = Features({"translation": Translation(languages=["en", "ro"])})
    data = DatasetDict(
        train=Dataset.from_dict({"translation": [{"en": "a cat", "ro": "o pisică"}]}, features=features)
    )
    check_languages(data, "en", "ro")
    with pytest.raises(
        ValueError, match=r"^`--target_lang de` is not in the train data, whose languages are en, ro\.$"
    ):
        check_languages(data, "en", "de")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_beams", "0"], "`--num_beams` must be 1 or more, got 0. To fix: pass a positive `--num_beams`."),
        (
            ["--generation_num_beams", "-1"],
            "`--generation_num_beams` must be 1 or more, got -1. To fix: pass a positive `--generation_num_beams`.",
        ),
        (
            ["--generation_max_length", "0"],
            "`--generation_max_length` must be 1 or more, got 0. To fix: pass a positive `--generation_max_length`.",
        ),
        (
            ["--num_beams", "2", "--generation_config", "GENERATION"],
            "Invalid generation settings: `num_return_sequences` (3) has to be smaller or equal to `num_beams` (2). "
            "To fix: change `--num_beams` or `--generation_max_length`, or the model's generation config.",
        ),
    ],
)
def test_generation_settings_are_checked_before_training(flags, message, monkeypatch, tmp_path, capsys):
    """Checked with transformers' own checks where it has them, before the first step: nothing is written."""
    from transformers import GenerationConfig

    GenerationConfig(num_beams=4, num_return_sequences=3).save_pretrained(tmp_path / "generation")
    flags = [str(tmp_path / "generation") if flag == "GENERATION" else flag for flag in flags]
    error = bad_input(
        monkeypatch,
        tmp_path,
        capsys,
        *LANGUAGES,
        *files("train", "validation"),
        "--do_eval",
        "--predict_with_generate",
        *flags,
    )
    assert error == f"run_translation.py: error: {message}"


def test_texts_longer_than_the_models_positions_are_capped_before_training(monkeypatch, tmp_path, caplog):
    """A BART of 24 positions and sources of ~50 tokens, with the default `--max_source_length 1024`: lengths are
    capped to the positions, with a warning, and ORT trains (without, it indexes past the position table)."""
    config = json.loads((EXAMPLE / "demo" / "bart-mini.json").read_text()) | {"max_position_embeddings": 24}
    (tmp_path / "bart.json").write_text(json.dumps(config))
    long_pair = {"en": "The dog sees a cat today . " * 7, "toy": "hodiu la hundo un kato vidas ."}
    train = write_jsonl(tmp_path / "train.json", [GOOD, long_pair] * 8)
    with caplog.at_level("INFO"):
        run_translation(
            monkeypatch,
            "--config_name",
            tmp_path / "bart.json",
            "--train_tokenizer",
            *LANGUAGES,
            "--train_file",
            train,
            "--validation_file",
            train,
            "--max_target_length",
            "64",
            "--do_train",
            "--do_eval",
            "--predict_with_generate",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            *common(tmp_path / "out"),
        )
    for flag, asked in (("--max_source_length", 1024), ("--max_target_length", 64), ("--val_max_target_length", 64)):
        assert f"`{flag} {asked}` is more than the model takes (24 tokens): using 24." in caplog.text
    assert "Training backend: onnxruntime on cpu." in caplog.text
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_gen_len"] <= 24
