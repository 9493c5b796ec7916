"""Benchmark ONNX Runtime against PyTorch on your model and machine, in one command, on the same tokens.

Runs an example script once per row with the same arguments and data, then writes into `--output_dir`:
`benchmark.md` (a runtime table and the ratios), `benchmark.json` (every figure) and `benchmark.png`. The rows:
- `plain`: a plain `transformers.Trainer`, what users run today (every padded column computed);
- `pytorch`: `ORTTrainer` in PyTorch (`--use_ort False`), trimming padding as the ONNX Runtime row does;
- `ort`: training and evaluation in ONNX Runtime (`--use_ort`, `--inference_with_ort`);
- `inductor`: PyTorch with `--torch_compile`; `int8`: PyTorch training, evaluation in ONNX Runtime's dynamic int8.
The ONNX Runtime ratios are taken against the `pytorch` row, which computes the same tokens; what trimming padding
gives is reported apart, as `pytorch` against `plain`. Each row names the backend that really ran, read from the
trainer's log (a fallback shows as PyTorch), the real and computed tokens per sample, and the achieved TFLOP/s
(6 x parameters x computed tokens for training, 2 x for evaluation; embeddings left out). The first training step
(ONNX Runtime's export and graph build) and the export for evaluation are reported apart.

    python -m ort_trainer.benchmark --model bert-base --task text-classification --output_dir out/bench

`--model` takes a published size (random weights, synthetic data: no download) or, with `--model_name_or_path`,
a real checkpoint and your data files through `--script_args`.
"""

import argparse
import json
import os
import random
import re
import statistics
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
    "bert-base": dict(
        model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "bert-large-cased": dict(
        model_type="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "roberta-base": dict(
        model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "roberta-large": dict(
        model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "t5-tiny": dict(model_type="t5", d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2),
    "t5-small": dict(model_type="t5", d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8),
    "t5-large": dict(model_type="t5", d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16),
}
# T5 with the special token ids of the tokenizer that `--train_tokenizer` builds for sequence-to-sequence models.
T5_SETTINGS = dict(dropout_rate=0.0, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
T5_VOCABULARY = 32128  # the published T5 checkpoints' LM head width, for benchmarks of those sizes
# Each row: its label, the script's flags, and whether it runs the plain transformers trainers.
ROWS = {
    "plain": ("transformers.Trainer", ["--use_ort", "False"], True),
    "pytorch": ("PyTorch", ["--use_ort", "False"], False),
    "ort": ("ONNX Runtime", ["--use_ort", "True", "--inference_with_ort"], False),
    "inductor": ("torch.compile", ["--use_ort", "False", "--torch_compile", "True"], False),
    "int8": (
        "ONNX Runtime int8",
        [
            "--use_ort",
            "False",
            "--inference_with_ort",
            "--ort_quantization",
            "dynamic_int8",
            "--ort_quantization_check",
            "False",
        ],
        False,
    ),
}
# Runs an example script with `transformers.Trainer` and `Seq2SeqTrainer` in place of the ORT trainers (counting
# tokens as ORTTrainer does, so that the rows can be compared).
PLAIN_TRAINER = (
    "import runpy, sys, transformers, ort_trainer; from ort_trainer.token_counts import TokenCountingMixin as T; "
    "ort_trainer.ORTTrainer = type('Trainer', (T, transformers.Trainer), {}); "
    "ort_trainer.Seq2SeqORTTrainer = type('Seq2SeqTrainer', (T, transformers.Seq2SeqTrainer), {}); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
# Dense fp16/bf16 matrix throughput reachable on known devices, in TFLOP/s, for the share of peak.
PEAK_TFLOPS = {"H200": 790}


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
        "--repeats",
        type=int,
        default=1,
        help="Run each backend this many times, in turns, and report each one's median run by train samples/s "
        "(for noisy machines).",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        default=["plain", "pytorch", "ort"],
        help="What to run: " + ", ".join(f"{key} ({label})" for key, (label, _, _) in ROWS.items()) + ".",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        help="The device's dense fp16 peak, for the share of it each row reaches (known: "
        + ", ".join(f"{name} {peak}" for name, peak in PEAK_TFLOPS.items())
        + ").",
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
            "--train_file",
            TRANSLATION_DATA / "train.json",
            "--validation_file",
            TRANSLATION_DATA / "validation.json",
            "--max_train_samples",
            args.train_samples,
            "--max_eval_samples",
            args.eval_samples,
            "--source_lang",
            "en",
            "--target_lang",
            "toy",
            "--predict_with_generate",
            "--max_source_length",
            args.seq_length,
            "--max_target_length",
            args.seq_length,
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
                rows.append(
                    {"tokens": words, "ner_tags": ["B-X" if int(word[1:]) % 5 == 0 else "O" for word in words]}
                )
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
        config = dict(
            config,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=max(512, args.seq_length + 2),
            vocab_size=1000,
        )
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
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        _, status, usage = os.wait4(process.pid, 0)
    log_text = log_path.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{script.name} failed, see {log_path}: {log_text.strip().splitlines()[-1]}")
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    results = json.loads((output_dir / "all_results.json").read_text())
    return {
        "training_backend": "PyTorch, transformers.Trainer"
        if plain_trainer
        else _logged(r"Training backend: ([^\n]*?)\.(?:\s|$)", log_text),
        "evaluation_backend": _logged(r"Evaluation (?:and generation )?backend: (ONNX Runtime on \w+)", log_text)
        or "PyTorch",
        "results": results,
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        # In the train metrics of the ORT trainers only.
        "first_step_seconds": results.get("train_first_step_seconds"),
        "train_steady_samples_per_second": _steady_train_throughput(results),
        "eval_steady_samples_per_second": _steady_eval_throughput(results),
        "peak_memory_mb": usage.ru_maxrss / 1024,
        "log": str(log_path),
    }


def _steady_train_throughput(results: dict) -> float:
    """Training samples/s after the first step (which holds ONNX Runtime's export and graph build), where the
    trainer reports the first step's time."""
    first_step = results.get("train_first_step_seconds")
    if first_step is None:
        return results["train_samples_per_second"]
    samples_per_step = results["train_samples_per_second"] / results["train_steps_per_second"]
    samples = results["train_samples_per_second"] * results["train_runtime"]
    return (samples - samples_per_step) / (results["train_runtime"] - first_step)


def _steady_eval_throughput(results: dict) -> float:
    """Evaluation samples/s without the one-time ONNX export and session creation of `--inference_with_ort`."""
    seconds = results["eval_runtime"] - results.get("eval_ort_setup_seconds", 0.0)
    return results["eval_samples"] / seconds


def _logged(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match.group(1).strip() if match else ""


def count_parameters(task: str, config_source) -> int:
    """The parameters each token is multiplied by, counted on the meta device (without memory)."""
    import torch
    import transformers

    auto_class = {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "translation": transformers.AutoModelForSeq2SeqLM,
    }[task]
    with torch.device("meta"):
        model = auto_class.from_config(transformers.AutoConfig.from_pretrained(config_source))
    return parameters_without_embeddings(model)


def parameters_without_embeddings(model) -> int:
    """The parameters each token is multiplied by: the model's, less its embedding tables."""
    import torch

    embeddings = {
        id(p) for module in model.modules() if isinstance(module, torch.nn.Embedding) for p in module.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def classifier_config(model: str, seq_length: int):
    """A published size as a sequence classifier's config, for benchmarks that build the model in process: BERT's
    vocabulary, positions for `seq_length`, dropout off so that every backend computes the same losses."""
    import transformers

    return transformers.AutoConfig.for_model(
        **ARCHITECTURES[model],
        vocab_size=30522,
        max_position_embeddings=max(514, seq_length + 2),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tflops(run: dict, parameters: int) -> dict:
    """Achieved TFLOP/s: 6 x parameters x computed tokens for a training step, 2 x for evaluation."""
    results = run["results"]
    return {
        split: factor
        * parameters
        * results[f"{split}_computed_tokens_per_sample"]
        * run[f"{split}_steady_samples_per_second"]
        / 1e12
        for split, factor in (("train", 6), ("eval", 2))
        if f"{split}_computed_tokens_per_sample" in results
    }


def ratio(candidate: dict, baseline: dict, figure: str) -> float:
    return candidate[figure] / baseline[figure]


def _figure(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    name, peak = report["model"], report["peak_tflops"]
    lines = [
        "| Model | Row (trained with) | Train samples/s | Tokens/sample real, computed | Train TFLOP/s | First "
        "step(s) "
        "| Eval backend | Eval samples/s | Eval tokens/sample computed | Eval TFLOP/s | Peak memory(MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in report["runs"].items():
        results, achieved = run["results"], run["tflops"]

        def rate(split):
            if split not in achieved:
                return "-"
            share = f" ({100 * achieved[split] / peak:.0f}% of peak)" if peak else ""
            return f"{achieved[split]:.2f}{share}"

        lines.append(
            f"| {name} | {label} ({run['training_backend']}) | {run['train_steady_samples_per_second']:.2f} | "
            f"{_figure(results.get('train_real_tokens_per_sample'), 1)}, "
            f"{_figure(results.get('train_computed_tokens_per_sample'), 1)} | {rate('train')} | "
            f"{_figure(run['first_step_seconds'])} | {run['evaluation_backend']} | "
            f"{run['eval_steady_samples_per_second']:.2f} | "
            f"{_figure(results.get('eval_computed_tokens_per_sample'), 1)} "
            f"| {rate('eval')} | {run['peak_memory_mb']:.0f} |"
        )
    if report["ratios"]:
        lines += [
            "",
            "| Model | Comparison | Same computed tokens | Train samples/s | Eval samples/s | Max loss difference |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {comparison} | {'yes' if figures['same_tokens'] else 'no'} | {figures['train']:.2f}x | "
            f"{figures['eval']:.2f}x | {figures['max_loss_difference']:.1e} |"
            for comparison, figures in report["ratios"].items()
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["runs"])
    figures = {
        "Train samples/s": [run["train_steady_samples_per_second"] for run in report["runs"].values()],
        "Eval samples/s": [run["eval_steady_samples_per_second"] for run in report["runs"].values()],
    }
    figure, axes = plt.subplots(1, len(figures), figsize=(3 + 2 * len(labels), 3.5))
    for axis, (title, values) in zip(axes, figures.items()):
        bars = axis.bar(labels, values, color=["#888888", "#bbbbbb", "#2a6fdb", "#7aa6ef", "#1a4f9b"][: len(labels)])
        axis.bar_label(bars, fmt="%.1f")
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=20)
    figure.suptitle(
        f"{report['model']}, {report['task']}, batch {report['batch_size']}, length {report['seq_length']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _median_run(runs: list) -> dict:
    """The run with the median train samples/s, holding every run's figures too."""
    ranked = sorted(runs, key=lambda run: run["train_steady_samples_per_second"])
    return dict(
        ranked[(len(ranked) - 1) // 2],
        train_samples_per_second_of_each_run=[run["train_steady_samples_per_second"] for run in runs],
        eval_samples_per_second_of_each_run=[run["eval_steady_samples_per_second"] for run in runs],
    )


def _folder(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def comparisons(all_runs: dict) -> dict:
    """ONNX Runtime (and torch.compile) against PyTorch with the same trimming; trimming padding against plain
    `transformers.Trainer`, reported as the trick's own gain. The rows ran in turns, so each ratio is the median of
    the ratios of the runs made side by side. Each says whether both computed the same tokens (the compile backend
    pads trimmed lengths up to its buckets)."""
    pairs = {
        "ONNX Runtime / PyTorch": ("ONNX Runtime", "PyTorch"),
        "ONNX Runtime int8 / PyTorch fp32": ("ONNX Runtime int8", "PyTorch"),
        "torch.compile / PyTorch": ("torch.compile", "PyTorch"),
        "padding trimming: PyTorch / transformers.Trainer": ("PyTorch", "transformers.Trainer"),
    }
    found = {}
    for name, (candidate, baseline) in pairs.items():
        if candidate in all_runs and baseline in all_runs:
            side_by_side = list(zip(all_runs[candidate], all_runs[baseline]))
            computed = [f"{split}_computed_tokens_per_sample" for split in ("train", "eval")]
            found[name] = {
                "train": statistics.median(ratio(a, b, "train_steady_samples_per_second") for a, b in side_by_side),
                "eval": statistics.median(ratio(a, b, "eval_steady_samples_per_second") for a, b in side_by_side),
                "same_tokens": all(
                    a["results"].get(key) == b["results"].get(key) for a, b in side_by_side for key in computed
                ),
                "max_loss_difference": max(
                    abs(x - y) for a, b in side_by_side for x, y in zip(a["losses"], b["losses"])
                ),
            }
    return found


def _device_peak(args) -> float | None:
    """The dense fp16 peak for the share of it reached: given, or known for this GPU; none for fp32 or CPU."""
    if args.peak_tflops or not args.fp16:
        return args.peak_tflops
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((peak for device, peak in PEAK_TFLOPS.items() if device in name), None)


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    script = SCRIPTS[args.task]
    if not script.is_file():
        sys.exit(
            f"benchmark: error: {script} not found: run the benchmark from a checkout of the ort_trainer repository."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    arguments = [
        *model_arguments(args, output_dir),
        *data_arguments(args.task, output_dir / "data", args),
        "--do_train",
        "--do_eval",
        "--max_steps",
        args.max_steps,
        "--per_device_train_batch_size",
        args.batch_size,
        "--per_device_eval_batch_size",
        args.eval_batch_size,
        "--logging_steps",
        1,
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        0,
        "--overwrite_output_dir",
        "--ort_fallback",
        "pytorch",
        *(["--fp16"] if args.fp16 else []),
    ]
    if args.task != "translation":
        arguments += ["--max_seq_length", args.seq_length]
    if args.task == "text-classification":
        arguments += ["--pad_to_max_length", "True"]
    all_runs = {ROWS[row][0]: [] for row in args.rows}
    for repeat in range(args.repeats):
        for row in args.rows:
            label, flags, plain = ROWS[row]
            folder = output_dir / (_folder(label) + (f"_{repeat + 1}" if args.repeats > 1 else ""))
            # The user's arguments come last, so that they win.
            all_runs[label].append(run_backend(script, [*arguments, *flags, *args.script_args.split()], folder, plain))
    runs = {label: _median_run(label_runs) for label, label_runs in all_runs.items()}
    if args.task != "translation":  # generation's work is not that of a forward pass per token
        parameters = count_parameters(args.task, args.model_name_or_path or output_dir)
        for run in runs.values():
            run["tflops"] = tflops(run, parameters)
    else:
        parameters = None
        for run in runs.values():
            run["tflops"] = {}
    report = {
        "model": args.model_name_or_path or args.model,
        "task": args.task,
        "batch_size": args.batch_size,
        "seq_length": args.seq_length,
        "real_tokens": args.real_tokens,
        "fp16": args.fp16,
        "parameters": parameters,
        "peak_tflops": _device_peak(args),
        "runs": runs,
        "ratios": comparisons(all_runs),
    }
    (output_dir / "benchmark.json").write_text(json.dumps(report, indent=1))
    (output_dir / "benchmark.md").write_text(markdown(report))
    plot(report, output_dir / "benchmark.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
