"""ORT vs PyTorch on CPU for a BERT-base-sized classifier (random init, dropout off), in one run:

- training step time, `transformers.Trainer` vs `ORTTrainer` with and without `--trim_padding`, batch 16 of
  short sentences (about 20 real tokens) padded to 128, as run_glue pads by default; the first ORT step (export and
  graph build) reported apart; losses compared step by step;
- evaluation throughput, PyTorch vs `--inference_with_ort`, batch 32, same padding, predicted labels compared;
  and the same-token ratio (every batch 128 real tokens, no padding to drop).

Usage: python benchmarks/cpu_core.py [--steps 8] [--eval_batches 8] [--size base]
"""

import argparse
import json
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from ort_trainer import ORTTrainer, ORTTrainingArguments


SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}


def make_rows(count, real_tokens, length=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        real = (
            int(torch.randint(real_tokens - 6, real_tokens + 7, (1,), generator=generator))
            if real_tokens < length
            else length
        )
        ids = torch.zeros(length, dtype=torch.long)
        ids[:real] = torch.randint(5, 30000, (real,), generator=generator)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": (ids != 0).long(),
                "token_type_ids": torch.zeros_like(ids),
                "labels": torch.tensor(int(ids[1]) % 2),
            }
        )
    return rows


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.losses, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class LossRecorder:
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.recorded.append(loss.item())
        return loss


def model_for(size):
    torch.manual_seed(0)
    config = BertConfig(**SIZES[size], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


def train(backend, size, rows, steps, trim=True):
    common = dict(
        output_dir="/tmp/cpu_core_bench",
        per_device_train_batch_size=16,
        max_steps=steps,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        learning_rate=1e-5,
    )
    if backend == "pytorch":
        base, args = Trainer, TrainingArguments(**common)
    else:
        base, args = ORTTrainer, ORTTrainingArguments(**common, ort_fallback="error", trim_padding=trim)
    trainer_class = type("Bench" + base.__name__, (LossRecorder, base), {"recorded": None})
    timer = StepTimer()
    trainer = trainer_class(model=model_for(size), args=args, train_dataset=rows, callbacks=[timer])
    trainer.recorded = []
    trainer.train()
    later = sorted(timer.times[1:])
    median = later[len(later) // 2]
    return {
        "first_step_s": timer.times[0],
        "step_s": median,
        "samples_per_s": 16 / median,
        "first_step_overhead_s": timer.times[0] - median,
        "losses": trainer.recorded,
    }


def evaluate(backend, size, rows, trim=True):
    args = ORTTrainingArguments(
        output_dir=f"/tmp/cpu_core_bench_eval_{backend}",
        per_device_eval_batch_size=32,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        use_ort=False,
        inference_with_ort=backend == "ort",
        trim_padding=trim,
    )
    trainer = ORTTrainer(model=model_for(size), args=args)
    trainer.predict(rows[:32])  # warm-up: export and session creation for ORT
    start = time.perf_counter()
    prediction = trainer.predict(rows)
    elapsed = time.perf_counter() - start
    return {
        "samples_per_s": len(rows) / elapsed,
        "labels": prediction.predictions.argmax(-1).tolist(),
        "logits": prediction.predictions,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--size", choices=list(SIZES), default="base")
    parser.add_argument("--skip_training", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    report = {"size": args.size, "threads": torch.get_num_threads()}

    if not args.skip_training:
        rows = make_rows(16 * args.steps, real_tokens=20)
        runs = {
            "pytorch": train("pytorch", args.size, rows, args.steps),
            "ort_trim": train("ort", args.size, rows, args.steps, trim=True),
            "ort_no_trim": train("ort", args.size, rows, args.steps, trim=False),
        }
        print(f"\nTraining, BERT-{args.size}, batch 16, ~20 real tokens padded to 128, {args.steps} steps")
        print(
            f"{'run':<12} {'step (s)':>9} {'samples/s':>10} {'vs PyTorch':>10} {'first step (s)':>15} "
            f"{'max |loss diff|':>16}"
        )
        for name, run in runs.items():
            diff = max(abs(a - b) for a, b in zip(run["losses"], runs["pytorch"]["losses"]))
            print(
                f"{name:<12} {run['step_s']:>9.3f} {run['samples_per_s']:>10.2f} "
                f"{runs['pytorch']['step_s'] / run['step_s']:>9.2f}x {run['first_step_s']:>15.2f} {diff:>16.2e}"
            )
        report["training"] = runs

    rows = make_rows(32 * args.eval_batches, real_tokens=20, seed=1)
    dense = make_rows(32 * args.eval_batches, real_tokens=128, seed=2)
    evals = {
        "pytorch_padded": evaluate("pytorch", args.size, rows),
        "ort_padded": evaluate("ort", args.size, rows, trim=True),
        "pytorch_dense": evaluate("pytorch", args.size, dense),
        "ort_dense": evaluate("ort", args.size, dense, trim=False),
    }
    print(f"\nEvaluation, BERT-{args.size}, batch 32, {len(rows)} samples")
    for kind, label in (
        ("padded", "~20 real tokens padded to 128 (run_glue default)"),
        ("dense", "128 real tokens (same tokens)"),
    ):
        torch_run, ort_run = evals[f"pytorch_{kind}"], evals[f"ort_{kind}"]
        same = sum(a == b for a, b in zip(torch_run["labels"], ort_run["labels"])) / len(rows)
        logit_diff = float(abs(torch_run["logits"] - ort_run["logits"]).max())
        print(
            f"{label}: PyTorch {torch_run['samples_per_s']:.1f}/s, ORT {ort_run['samples_per_s']:.1f}/s, "
            f"{ort_run['samples_per_s'] / torch_run['samples_per_s']:.2f}x, labels agree {same:.1%}, max |logit diff| "
            f"{logit_diff:.1e}"
        )
    report["evaluation"] = {name: {"samples_per_s": run["samples_per_s"]} for name, run in evals.items()}
    with open("/tmp/cpu_core_bench.json", "w") as file:
        json.dump(report, file, indent=1, default=float)


if __name__ == "__main__":
    main()
