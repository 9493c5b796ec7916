"""Benchmark ONNX Runtime against PyTorch on your model and machine, in one command.

Runs an example script twice with the same arguments, once training and evaluating in PyTorch (`--use_ort False`)
and once in ONNX Runtime (`--use_ort`, `--inference_with_ort`), then writes into `--output_dir`:
`benchmark.md` (a runtime table and a gain table), `benchmark.json` (every figure) and `benchmark.png`.
Each row names the backend that really ran, read from the trainer's log: a fallback shows as PyTorch. The first
training step (ORT's export and graph build) and the ONNX export for evaluation are reported apart; evaluation
samples/s leave the export out.

    python -m ort_trainer.benchmark --model bert-base --task text-classification --output_dir out/bench

`--model` takes a published size (random weights, synthetic data: no download) or, with `--model_name_or_path`,
a real checkpoint and your data files through `--script_args`. Where no ORT training build exists (CUDA 13 GPUs),
`--compare trainer` runs a plain `transformers.Trainer` against `ORTTrainer`'s PyTorch path with ONNX Runtime
inference: the trainer's overhead, and the inference gain.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = {
    "text-classification": EXAMPLES / "text-classification" / "run_glue.py",
    "token-classification": EXAMPLES / "token-classification" / "run_ner.py",
    "translation": EXAMPLES / "translation" / "run_translation.py",
}
# Translation trains on the shipped English-Toy corpus.
TRANSLATION_DATA = EXAMPLES / "translation" / "data" / "en-toy"
# The published sizes; dropout off so that both backends compute the same losses.
ARCHITECTURES = {
    "tiny": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "bert-base": dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large-cased": dict(model_type="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "roberta-base": dict(model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "roberta-large": dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "t5-tiny": dict(model_type="t5", d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2),
    "t5-small": dict(model_type="t5", d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8),
    "t5-large": dict(model_type="t5", d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16),
}
# T5 with the special token ids of the tokenizer that `--train_tokenizer` builds for sequence-to-sequence models.
T5_SETTINGS = dict(dropout_rate=0.0, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
# What each comparison runs: a label, the script's extra flags, and whether to swap in the plain transformers
# trainers. "trainer" is for machines without an ORT training build (such as CUDA 13 GPUs): ORTTrainer's PyTorch
# path and ORT inference against a plain `transformers.Trainer`.
COMPARISONS = {
    "ort": {"PyTorch": (["--use_ort", "False"], False), "ONNX Runtime": (["--use_ort", "True", "--inference_with_ort"], False)},
    "trainer": {
        "transformers.Trainer": (["--use_ort", "False"], True),
        "ORTTrainer": (["--use_ort", "False", "--inference_with_ort"], False),
    },
}
# Runs an example script with `transformers.Trainer` and `Seq2SeqTrainer` in place of the ORT trainers.
PLAIN_TRAINER = (
    "import runpy, sys, transformers, ort_trainer; "
    "ort_trainer.ORTTrainer, ort_trainer.Seq2SeqORTTrainer = transformers.Trainer, transformers.Seq2SeqTrainer; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(SCRIPTS), default="text-classification")
    parser.add_argument("--model", choices=list(ARCHITECTURES), default="bert-base")
    parser.add_argument("--model_name_or_path", help="A real checkpoint instead of a random `--model`.")
    parser.add_argument("--seq_length", type=int, default=128, help="Inputs are padded to this length.")
    parser.add_argument("--real_tokens", type=int, default=20, help="Average words per synthetic sentence.")
    parser.add_argument("--train_samples", type=int, default=256)
    parser.add_argument("--eval_samples", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="Run each backend this many times, in turns, and report each one's median run by train samples/s "
        "(for noisy machines).",
    )
    parser.add_argument(
        "--compare", choices=list(COMPARISONS), default="ort",
        help="ort: PyTorch against ONNX Runtime training and inference. trainer: a plain transformers.Trainer against "
        "ORTTrainer's PyTorch path with ONNX Runtime inference (where no ORT training build exists).",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--script_args", default="", help="More arguments for the example script, as one string.")
    return parser.parse_args(argv)


def data_arguments(task: str, folder: Path, args) -> list:
    """Sentences of about `real_tokens` words from a fixed vocabulary; labels from the words, so both backends
    learn the same thing (translation takes the shipped corpus, cut to the sample counts). Returns the script
    arguments that point at the files."""
    if task == "translation":
        return [
            "--train_file", TRANSLATION_DATA / "train.json", "--validation_file", TRANSLATION_DATA / "validation.json",
            "--max_train_samples", args.train_samples, "--max_eval_samples", args.eval_samples,
            "--source_lang", "en", "--target_lang", "toy", "--predict_with_generate",
            "--max_source_length", args.seq_length, "--max_target_length", args.seq_length,
        ]
    rng = random.Random(0)
    vocabulary = [f"w{index}" for index in range(500)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", args.train_samples), ("validation", args.eval_samples)):
        rows = []
        for _ in range(size):
            words = rng.choices(vocabulary, k=max(1, int(rng.gauss(args.real_tokens, 4))))
            if task == "text-classification":
                rows.append({"sentence": " ".join(words), "label": int(words[0][1:]) % 2})
            else:
                rows.append({"tokens": words, "ner_tags": ["B-X" if int(word[1:]) % 5 == 0 else "O" for word in words]})
        with open(folder / f"{split}.json", "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
    return ["--train_file", folder / "train.json", "--validation_file", folder / "validation.json"]


def model_arguments(args, folder: Path) -> list:
    if args.model_name_or_path:
        return ["--model_name_or_path", args.model_name_or_path]
    config = ARCHITECTURES[args.model]
    if config["model_type"] == "t5":
        config = dict(config, **T5_SETTINGS)
    else:
        config = dict(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=max(512, args.seq_length + 2), vocab_size=1000)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return ["--config_name", path, "--train_tokenizer"]


def run_backend(script: Path, arguments: list, output_dir: Path, plain_trainer: bool = False) -> dict:
    """Run the script (with the plain transformers trainers if asked); return its results, the backends its log
    names, and its peak memory."""
    launcher = ["-c", PLAIN_TRAINER] if plain_trainer else []
    command = [sys.executable, *launcher, str(script), *map(str, arguments), "--output_dir", str(output_dir)]
    log_path = output_dir.with_suffix(".log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    log_text = log_path.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{script.name} failed, see {log_path}: {log_text.strip().splitlines()[-1]}")
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    results = json.loads((output_dir / "all_results.json").read_text())
    return {
        "training_backend": "PyTorch, transformers.Trainer" if plain_trainer else _logged(r"Training backend: ([^\n]*?)\.(?:\s|$)", log_text),
        "evaluation_backend": _logged(r"Evaluation (?:and generation )?backend: (ONNX Runtime on \w+)", log_text) or "PyTorch",
        "results": results,
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        # In the train metrics of the ORT trainers only.
        "first_step_seconds": results.get("train_first_step_seconds"),
        "eval_steady_samples_per_second": _steady_eval_throughput(results),
        "peak_memory_mb": usage.ru_maxrss / 1024,
        "log": str(log_path),
    }


def _steady_eval_throughput(results: dict) -> float:
    """Evaluation samples/s without the one-time ONNX export and session creation of `--inference_with_ort`."""
    seconds = results["eval_runtime"] - results.get("eval_ort_setup_seconds", 0.0)
    return results["eval_samples"] / seconds


def _logged(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match.group(1).strip() if match else ""


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def gain(ort: float, pytorch: float, lower_is_better: bool) -> float:
    return 100 * ((pytorch - ort) / pytorch if lower_is_better else (ort - pytorch) / pytorch)


def markdown(report: dict) -> str:
    name = report["model"]
    rows = [
        "| Model | Backend (trained with) | Runtime(s) | Train samples(/s) | First step(s) | Eval backend | Eval samples(/s) | Eval setup(s) | Peak memory(MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in report["runs"].items():
        results = run["results"]
        rows.append(
            f"| {name} | {label} ({run['training_backend']}) | {results['train_runtime']:.1f} | "
            f"{results['train_samples_per_second']:.2f} | {_seconds(run['first_step_seconds'])} | {run['evaluation_backend']} | "
            f"{run['eval_steady_samples_per_second']:.2f} | {results.get('eval_ort_setup_seconds', 0.0):.1f} | "
            f"{run['peak_memory_mb']:.0f} |"
        )
    gains = report["gain"]
    rows += [
        "",
        "| Model | Latency gain | Train throughput gain | Eval throughput gain | Max loss difference |",
        "|---|---|---|---|---|",
        f"| {name} | {gains['latency_percent']:.1f}% | {gains['train_throughput_percent']:.1f}% | "
        f"{gains['eval_throughput_percent']:.1f}% | {gains['max_loss_difference']:.1e} |",
    ]
    return "\n".join(rows) + "\n"


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["runs"])
    figures = {
        "Train samples/s": [run["results"]["train_samples_per_second"] for run in report["runs"].values()],
        "Eval samples/s": [run["eval_steady_samples_per_second"] for run in report["runs"].values()],
    }
    figure, axes = plt.subplots(1, len(figures), figsize=(9, 3.5))
    for axis, (title, values) in zip(axes, figures.items()):
        bars = axis.bar(labels, values, color=["#888888", "#2a6fdb"])
        axis.bar_label(bars, fmt="%.1f")
        axis.set_title(title)
    figure.suptitle(f"{report['model']}, {report['task']}, batch {report['batch_size']}, length {report['seq_length']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _median_run(runs: list) -> dict:
    """The run with the median train samples/s, holding every run's figure too."""
    ranked = sorted(runs, key=lambda run: run["results"]["train_samples_per_second"])
    return dict(ranked[(len(ranked) - 1) // 2], train_samples_per_second_of_each_run=[
        run["results"]["train_samples_per_second"] for run in runs
    ])


def _folder(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    script = SCRIPTS[args.task]
    if not script.is_file():
        sys.exit(f"benchmark: error: {script} not found: run the benchmark from a checkout of the ort_trainer repository.")
    output_dir.mkdir(parents=True, exist_ok=True)
    arguments = [
        *model_arguments(args, output_dir), *data_arguments(args.task, output_dir / "data", args),
        "--do_train", "--do_eval", "--max_steps", args.max_steps,
        "--per_device_train_batch_size", args.batch_size, "--per_device_eval_batch_size", args.eval_batch_size,
        "--logging_steps", 1, "--save_strategy", "no", "--report_to", "none", "--seed", 0, "--overwrite_output_dir",
        "--ort_fallback", "pytorch", *(["--fp16"] if args.fp16 else []),
    ]
    if args.task != "translation":
        arguments += ["--max_seq_length", args.seq_length]
    if args.task == "text-classification":
        arguments += ["--pad_to_max_length", "True"]
    # The user's arguments come last, so that they win.
    all_runs = {label: [] for label in COMPARISONS[args.compare]}
    for repeat in range(args.repeats):
        for label, (flags, plain) in COMPARISONS[args.compare].items():
            folder = output_dir / (_folder(label) + (f"_{repeat + 1}" if args.repeats > 1 else ""))
            all_runs[label].append(run_backend(script, [*arguments, *flags, *args.script_args.split()], folder, plain))
    runs = {label: _median_run(label_runs) for label, label_runs in all_runs.items()}
    baseline, candidate = runs.values()  # the gains are the second run's over the first
    report = {
        "model": args.model_name_or_path or args.model, "task": args.task, "batch_size": args.batch_size,
        "seq_length": args.seq_length, "real_tokens": args.real_tokens, "fp16": args.fp16, "compare": args.compare,
        "runs": runs,
        "gain": {
            "latency_percent": gain(candidate["results"]["train_runtime"], baseline["results"]["train_runtime"], True),
            "train_throughput_percent": gain(
                candidate["results"]["train_samples_per_second"], baseline["results"]["train_samples_per_second"], False
            ),
            "eval_throughput_percent": gain(
                candidate["eval_steady_samples_per_second"], baseline["eval_steady_samples_per_second"], False
            ),
            "max_loss_difference": max(abs(a - b) for a, b in zip(baseline["losses"], candidate["losses"])),
        },
    }
    (output_dir / "benchmark.json").write_text(json.dumps(report, indent=1))
    (output_dir / "benchmark.md").write_text(markdown(report))
    plot(report, output_dir / "benchmark.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
