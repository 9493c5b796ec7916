"""The largest batch each backend trains without running out of device memory, and the memory it took.

Each batch size of `--batch_sizes` trains `--steps` steps of `benchmarks/train_step.py` in a process of its own (so
that a failed allocation leaves nothing behind), in ascending order, until one fails (out of memory, or the error
said in the table). The compile backend exports a new pair of graphs for each batch size. Device memory is read
from the device (ONNX Runtime allocates outside PyTorch's allocator).

Usage: python benchmarks/max_batch.py --model roberta-large --fp16 --batch_sizes 64 128 256 512 1024
[--backends eager ort ort-cuda-graphs]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


OUT_OF_MEMORY = ("out of memory", "Failed to allocate memory", "CUDA_ERROR_OUT_OF_MEMORY", "bad_alloc")


def try_batch(args, backend: str, batch_size: int) -> tuple[dict | None, str]:
    """The run's results, or None and why it failed."""
    with tempfile.TemporaryDirectory() as directory:
        results = Path(directory) / "runs.json"
        command = [
            sys.executable,
            str(Path(__file__).with_name("train_step.py")),
            f"--model={args.model}",
            f"--task={args.task}",
            f"--seq_length={args.seq_length}",
            f"--batch_size={batch_size}",
            f"--steps={args.steps}",
            "--warmup=1",
            f"--logging_steps={args.steps}",
            f"--optim={args.optim}",
            f"--backends={backend}",
            f"--json={results}",
        ] + (["--fp16"] if args.fp16 else [])
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode == 0:
            return json.loads(results.read_text())[backend][0], ""
    output = process.stdout + process.stderr
    if any(sign in output for sign in OUT_OF_MEMORY):
        return None, "out of memory"
    lines = [line for line in output.splitlines() if line.strip()]
    return None, f"failed: {lines[-1] if lines else process.returncode}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-large")
    parser.add_argument("--task", default="sequence-classification")
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--optim", default="adamw_torch_fused")
    parser.add_argument("--backends", nargs="+", default=["eager", "ort", "ort-cuda-graphs"])
    args = parser.parse_args()

    print(f"{args.model} {args.task}, {args.seq_length} tokens, {'fp16' if args.fp16 else 'fp32'}, {args.optim}\n")
    print("| Backend | largest batch trained | its device memory (GiB) | ms/step there | next size |")
    print("|---|---|---|---|---|")
    for backend in args.backends:
        largest, outcome = None, "not tried (the list ended)"
        for batch_size in sorted(args.batch_sizes):
            result, failure = try_batch(args, backend, batch_size)
            if result is None:
                outcome = f"{batch_size}: {failure}"
                break
            largest = (batch_size, result)
        if largest is None:
            print(f"| {backend} | none | - | - | {outcome} |")
            continue
        batch_size, result = largest
        memory, milliseconds = result["memory"] / 2**30, 1000 * result["seconds"]
        print(f"| {backend} | {batch_size} | {memory:.1f} | {milliseconds:.1f} | {outcome} |")


if __name__ == "__main__":
    main()
