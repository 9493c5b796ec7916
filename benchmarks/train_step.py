"""Training step time of one model (a sequence classifier; with `--task`, a token classifier or a T5 translation
model) in PyTorch eager, in ONNX Runtime's compile backend and in torch.compile (inductor), on the same tokens (every
row `--seq_length` real tokens, no padding; translation targets as long as the sources), after warm-up, in one
process:

- mean step time over the steps after warm-up (timed from the first one's start to the last one's end on the
  device; the timer adds no wait in between, the Trainer's own NaN check of each step's loss, on by default, reads
  it on the host), samples/s and achieved TFLOP/s (6 x parameters without embeddings x tokens);
- the device memory in use at the end, read from the device (ONNX Runtime allocates outside PyTorch's allocator,
  so `torch.cuda.max_memory_allocated` would miss it; both allocators keep what they reserved);
- each backend's logged losses against eager's (with `--dropout` on CUDA, eager's masks are not the compile
  backend's, so the losses differ by dropout's noise);
- with `--repeats`, the backends run in turns, and each figure is the median of its runs (the ratio: of the paired
  runs' ratios).

Usage: python benchmarks/train_step.py --model bert-base --batch_size 32 --fp16 [--backends eager ort inductor]
[--optim adamw_torch_fused] [--dropout 0.1] [--repeats 3] [--task token-classification] [--profile_steps 3]
       [--training_args '{"logging_nan_inf_filter": false}']
       python benchmarks/train_step.py --model t5-large --task translation --batch_size 32 --fp16
"""

import argparse
import collections
import gc
import json
import statistics
import time

import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    TrainerCallback,
)

from ort_trainer import ORTTrainer, ORTTrainingArguments
from ort_trainer.benchmark import (
    ARCHITECTURES,
    T5_SETTINGS,
    T5_VOCABULARY,
    classifier_config,
    parameters_without_embeddings,
)


BACKENDS = {
    "eager": dict(use_ort=False),
    "ort": dict(use_ort=True, ort_backend="compile", ort_fallback="error"),
    "ort-cuda-graphs": dict(use_ort=True, ort_backend="compile", ort_fallback="error", ort_cuda_graphs=True),
    "inductor": dict(use_ort=False, torch_compile=True),
}
TASKS = {
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "translation": AutoModelForSeq2SeqLM,
}


class StepTimer(TrainerCallback):
    """The mean time of the steps after `warmup`, from the first one's start to the last one's end on the device,
    adding no wait in between, and the device memory in use then."""

    def __init__(self, warmup):
        self.warmup, self.seconds, self.memory, self._start = warmup, None, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._synchronize()
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            self._synchronize()
            self.seconds = (time.perf_counter() - self._start) / (state.global_step - self.warmup)
            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                self.memory = total - free

    @staticmethod
    def _synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


class KernelProfile(TrainerCallback):
    """The last `steps` steps of the warm-up under the torch profiler: device time a step and the kernels that take
    it (ONNX Runtime's included: the profiler sees every kernel on the device), or on the CPU the operators' own
    time. Printed at once; the timed steps come after it."""

    def __init__(self, warmup, steps):
        self.first, self.steps, self.profiler = warmup - steps, steps, None
        self.cuda = torch.cuda.is_available()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            StepTimer._synchronize()
            activity = torch.profiler.ProfilerActivity.CUDA if self.cuda else torch.profiler.ProfilerActivity.CPU
            self.profiler = torch.profiler.profile(activities=[activity])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first + self.steps:
            StepTimer._synchronize()
            self.profiler.__exit__(None, None, None)
            times = collections.defaultdict(lambda: [0, 0.0])
            for event in self.profiler.events():
                if (event.device_type == torch.autograd.DeviceType.CUDA) == self.cuda:
                    time_us = event.time_range.elapsed_us() if self.cuda else event.self_cpu_time_total
                    times[event.name][0] += 1
                    times[event.name][1] += time_us / 1000 / self.steps
            where = "GPU kernel" if self.cuda else "CPU operator"
            print(
                f"\n{where} time a step, steps {self.first + 1}-{self.first + self.steps}: "
                f"{sum(t for _, t in times.values()):.1f} ms over {sum(c for c, _ in times.values()) // self.steps} "
                "calls; the largest:"
            )
            for name, (count, milliseconds) in sorted(times.items(), key=lambda item: -item[1][1])[:15]:
                print(f"{milliseconds:8.2f} ms {count // self.steps:6d}x  {name[:100]}")


def model_config(model, task, seq_length):
    if task == "translation":
        return AutoConfig.for_model(**ARCHITECTURES[model], **T5_SETTINGS, vocab_size=T5_VOCABULARY)
    return classifier_config(model, seq_length)


def rows(count, length, vocab, task, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (count, length), generator=generator)
    targets = torch.randint(5, vocab, (count, length), generator=generator)
    labels = {
        "sequence-classification": ids[:, 1] % 2,
        "token-classification": ids % 2,
        "translation": targets,
    }[task]
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label} for row, label in zip(ids, labels)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(ARCHITECTURES), default="bert-base")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--task", choices=list(TASKS), default="sequence-classification")
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="Steps left out of the timing (exports, compiles).")
    parser.add_argument(
        "--logging_steps", type=int, default=10, help="Losses are compared at these steps (a log waits for the GPU)."
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="The model's dropout probability (off by default, so that every backend computes the same losses).",
    )
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--optim", default="adamw_torch", help="The optimizer of every row, e.g. adamw_torch_fused.")
    parser.add_argument(
        "--training_args",
        type=json.loads,
        default={},
        help="More Trainer arguments for every row, as JSON, e.g. '{\"logging_nan_inf_filter\": false}'.",
    )
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each backend, in turns (medians reported).")
    parser.add_argument("--json", help="Also write every run's step time, losses and device memory to this file.")
    parser.add_argument(
        "--profile_steps", type=int, default=0, help="Profile this many of the last warm-up steps of each run."
    )
    args = parser.parse_args()
    if ("t5" in args.model) != (args.task == "translation"):
        parser.error("--task translation needs a T5 --model; the classification tasks need one that is not T5.")
    if args.profile_steps and args.profile_steps > args.warmup - 2:
        parser.error("--profile_steps profiles warm-up steps after the first two (exports): raise --warmup.")

    config = model_config(args.model, args.task, args.seq_length)
    if args.dropout:
        names = (
            ["dropout_rate"] if args.task == "translation" else ["hidden_dropout_prob", "attention_probs_dropout_prob"]
        )
        config.update(dict.fromkeys(names, args.dropout))
    model_class = TASKS[args.task]
    torch.manual_seed(0)
    initial = model_class.from_config(config).state_dict()
    data = rows(args.batch_size * args.steps, args.seq_length, config.vocab_size, args.task)
    with torch.device("meta"):
        parameters = parameters_without_embeddings(model_class.from_config(config))

    def train(backend):
        model = model_class.from_config(config)
        model.load_state_dict(initial)
        training_args = ORTTrainingArguments(
            output_dir=f"/tmp/train_step_{backend}",
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=1e-5,
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to=[],
            seed=0,
            fp16=args.fp16,
            optim=args.optim,
            disable_tqdm=True,
            **BACKENDS[backend],
            **args.training_args,
        )
        timer = StepTimer(args.warmup)
        callbacks = [timer, KernelProfile(args.warmup, args.profile_steps)] if args.profile_steps else [timer]
        if args.profile_steps:
            print(f"\n{backend}:")
        trainer = ORTTrainer(model=model, args=training_args, train_dataset=data, callbacks=callbacks)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        del trainer, model
        torch._dynamo.reset()  # dynamo's cache would keep this run's graphs, sessions and buffers alive
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return dict(seconds=timer.seconds, losses=losses, memory=timer.memory)

    runs = {backend: [] for backend in args.backends}
    for _ in range(args.repeats):
        for backend in args.backends:
            runs[backend].append(train(backend))

    if args.json:
        with open(args.json, "w") as file:
            json.dump(runs, file, indent=1)
    eager = runs.get("eager")
    print(
        f"\n{args.model} {args.task}, batch {args.batch_size} x {args.seq_length} real tokens, "
        f"{'fp16' if args.fp16 else 'fp32'}, {args.optim}, dropout {args.dropout}, "
        f"mean of steps {args.warmup + 1}-{args.steps}, median of {args.repeats} runs in turns, "
        f"{parameters / 1e6:.0f}M parameters without embeddings"
        f"{', training arguments ' + json.dumps(args.training_args) if args.training_args else ''}\n"
    )
    print(
        "| Backend | ms/step (runs) | samples/s | TFLOP/s | vs eager (median of paired runs) | device memory (GiB) "
        "| max loss difference vs eager |"
    )
    print("|---|---|---|---|---|---|---|")
    for backend, results in runs.items():
        seconds = statistics.median(result["seconds"] for result in results)
        samples = args.batch_size / seconds
        flops = 6 * parameters * args.batch_size * args.seq_length / seconds / 1e12
        each = ", ".join(f"{1000 * result['seconds']:.1f}" for result in results)
        ratio, drift = "-", float("nan")
        if eager:
            ratio = f"{statistics.median(e['seconds'] / r['seconds'] for e, r in zip(eager, results)):.2f}x"
            drift = max(abs(a - b) for a, b in zip(results[0]["losses"], eager[0]["losses"]))
        print(
            f"| {backend} | {1000 * seconds:.1f} ({each}) | {samples:.0f} | {flops:.1f} | {ratio} | "
            f"{max(result['memory'] for result in results) / 2**30:.1f} | {drift:.1e} |"
        )


if __name__ == "__main__":
    main()
