"""Where evaluation time goes on a GPU: the forward alone against the Trainer's evaluation loop around it.

For one random classifier, rows of about 22 real tokens padded to `--seq_length`, batch `--batch_size`, fp16:
- compute only: the forward on batches already collated and on the device, full width and trimmed to the longest
  row, PyTorch (SDPA, autocast) against the ONNX Runtime session `--inference_with_ort` builds;
- ONNX Runtime CUDA graphs: the same graph with fixed shapes, captured and replayed (full width; trimmed batches
  padded up to 32-token buckets, one graph each, which computes more tokens than trimming);
- `trainer.evaluate()` on the same rows, PyTorch and ONNX Runtime, with and without trimming (after a first call,
  so the export is not counted; `--repeats` runs of each in turns, and the median of the paired ratios), and a
  profile of the ONNX Runtime loop's host time (from an evaluation not counted).

Usage: python benchmarks/eval_time.py --model roberta-large [--batches 64] [--repeats 3] [--non_blocking]
[--compute_only]
"""

import argparse
import cProfile
import io
import pstats
import statistics
import time

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from ort_trainer import ORTTrainer, ORTTrainingArguments, cuda_streams, inference
from ort_trainer.benchmark import ARCHITECTURES, PEAK_TFLOPS, classifier_config, parameters_without_embeddings
from ort_trainer.padding import trim_padding


BUCKET = 32


def random_rows(count, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        real = max(4, min(length, int(torch.normal(22.0, 6.0, (1,), generator=generator))))
        ids = torch.zeros(length, dtype=torch.long)
        ids[:real] = torch.randint(5, 30000, (real,), generator=generator)
        mask = (torch.arange(length) < real).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(index % 2)})
    return rows


class CUDAGraphSession:
    """The exported graph with fixed batch and sequence sizes, captured by ONNX Runtime as a CUDA graph; inputs are
    copied into buffers bound once."""

    def __init__(self, path, batch_size, width, num_labels):
        import onnx
        import onnxruntime
        from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

        model = onnx.load(str(path))
        make_dim_param_fixed(model.graph, "batch", batch_size)
        make_dim_param_fixed(model.graph, "sequence", width)
        fix_output_shapes(model)
        fixed = path.with_name(f"{path.stem}_{batch_size}x{width}.onnx")
        onnx.save(model, str(fixed))
        self.device = torch.device("cuda", torch.cuda.current_device())
        provider = ("CUDAExecutionProvider", cuda_streams.provider_options(self.device, enable_cuda_graph="1"))
        self.session = onnxruntime.InferenceSession(str(fixed), providers=[provider])
        self.inputs = {
            node.name: torch.zeros((batch_size, width), dtype=torch.long, device=self.device)
            for node in self.session.get_inputs()
        }
        self.logits = torch.empty((batch_size, num_labels), dtype=torch.float32, device=self.device)
        self.binding = self.session.io_binding()
        index = self.device.index
        for name, tensor in self.inputs.items():
            self.binding.bind_input(name, "cuda", index, np.int64, list(tensor.shape), tensor.data_ptr())
        self.binding.bind_output("logits", "cuda", index, np.float32, list(self.logits.shape), self.logits.data_ptr())

    def __call__(self, batch):
        for name, tensor in self.inputs.items():
            tensor.copy_(batch[name])
        cuda_streams.run_with_iobinding(self.session, self.binding, self.device)
        return self.logits.clone()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[name for name in ARCHITECTURES if "t5" not in name], default="bert-base")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--compute_only", action="store_true", help="Skip the trainer.evaluate() part.")
    parser.add_argument("--repeats", type=int, default=3, help="trainer.evaluate() runs of each kind, in turns.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument(
        "--non_blocking",
        action="store_true",
        help="Copy each batch to the device without waiting (accelerate's `non_blocking`, from pinned memory).",
    )
    args = parser.parse_args()
    batch_size, length = args.batch_size, args.seq_length

    config = classifier_config(args.model, length)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).cuda().eval()
    parameters = parameters_without_embeddings(model)
    rows = random_rows(batch_size * args.batches, length)
    full = [
        {key: torch.stack([row[key] for row in rows[start : start + batch_size]]).cuda() for key in rows[0]}
        for start in range(0, len(rows), batch_size)
    ]
    trimmed = [trim_padding(dict(batch)) for batch in full]

    def measure(label, forward, batches, repeats=3):
        forward(batches[0])
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                forward(batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        tokens = sum(batch["input_ids"].numel() for batch in batches)
        print(
            f"  {label:44s} {len(batches) * batch_size / seconds:9.0f} samples/s "
            f"{2 * parameters * tokens / seconds / 1e12:6.1f} TFLOP/s"
        )

    def pytorch(batch):
        with torch.autocast("cuda", torch.float16), torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    sample = {key: value for key, value in full[0].items() if key != "labels"}
    inference_model = inference.load_for_inference(model, sample, f"/tmp/eval_time_{args.model}", fp16=True)
    session = inference_model.sessions[0]

    def onnxruntime(batch):
        return session({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})["logits"]

    print(f"{args.model}: {parameters / 1e6:.0f}M parameters without embeddings, batch {batch_size} x {length}")
    print(" ", inference_model.description())
    for label, batches in (("full width", full), ("trimmed", trimmed)):
        print(f" compute only, {label}:")
        measure("PyTorch fp16 SDPA", pytorch, batches)
        measure("ONNX Runtime fp16 (I/O binding)", onnxruntime, batches)

    graphs = {
        width: CUDAGraphSession(session.path, batch_size, width, config.num_labels)
        for width in range(BUCKET, length + 1, BUCKET)
    }

    def bucketed(batch):
        width = -(-batch["input_ids"].shape[1] // BUCKET) * BUCKET
        pad = width - batch["input_ids"].shape[1]
        return graphs[width]({key: torch.nn.functional.pad(batch[key], (0, pad)) for key in graphs[width].inputs})

    difference = (onnxruntime(full[1]) - graphs[length](full[1])).abs().max().item()
    print(f" compute only, ONNX Runtime CUDA graphs (max logit difference to the session: {difference:.2g}):")
    measure(f"full width (one {batch_size}x{length} graph)", graphs[length], full)
    measure(f"trimmed, padded up to {BUCKET}-token buckets", bucketed, trimmed)
    computed = sum(-(-batch["input_ids"].shape[1] // BUCKET) * BUCKET for batch in trimmed) / len(trimmed)
    real = sum(batch["input_ids"].shape[1] for batch in trimmed) / len(trimmed)
    print(f"  (the buckets compute {computed:.1f} tokens a row, trimming {real:.1f})")
    if args.compute_only:
        return

    print(f" trainer.evaluate(), after a first call (the export), median of {args.repeats} runs in turns:")
    trainers = {}
    for trim in (False, True):
        for use_ort in (False, True):
            training_args = ORTTrainingArguments(
                output_dir=f"/tmp/eval_time_{args.model}",
                per_device_eval_batch_size=batch_size,
                dataloader_num_workers=args.dataloader_num_workers,
                accelerator_config={"non_blocking": args.non_blocking},
                fp16=True,
                report_to=[],
                inference_with_ort=use_ort,
                trim_padding=trim,
                use_ort=False,
                disable_tqdm=True,
            )
            trainers[trim, use_ort] = ORTTrainer(model=model, args=training_args, eval_dataset=rows)
            trainers[trim, use_ort].evaluate()
    profiler = cProfile.Profile()  # an evaluation of its own: the profiler slows the loop it watches
    profiler.enable()
    trainers[False, True].evaluate()
    profiler.disable()
    profile_text = io.StringIO()
    pstats.Stats(profiler, stream=profile_text).sort_stats("tottime").print_stats(14)
    throughput = {key: [] for key in trainers}
    for _ in range(args.repeats):
        for (trim, use_ort), trainer in trainers.items():
            metrics = trainer.evaluate()
            seconds = metrics["eval_runtime"] - metrics.get("eval_ort_setup_seconds", 0)
            throughput[trim, use_ort].append(len(rows) / seconds)
    peak = next((tflops for name, tflops in PEAK_TFLOPS.items() if name in torch.cuda.get_device_name()), None)
    for trim in (False, True):
        tokens_per_sample = sum(batch["input_ids"].numel() for batch in (trimmed if trim else full)) / len(rows)
        for use_ort in (False, True):
            samples = statistics.median(throughput[trim, use_ort])
            tflops = 2 * parameters * tokens_per_sample * samples / 1e12
            print(
                f"  {'ONNX Runtime' if use_ort else 'PyTorch':12s} trim_padding={trim!s:5s} {samples:9.0f} samples/s "
                f"{tflops:6.1f} TFLOP/s{f' ({tflops / peak:.0%} of peak)' if peak else ''}, "
                f"{1000 * batch_size / samples:.2f} ms a batch; runs: "
                f"{', '.join(f'{value:.0f}' for value in throughput[trim, use_ort])}"
            )
        ratios = [ort / pytorch for ort, pytorch in zip(throughput[trim, True], throughput[trim, False])]
        print(f"  trim_padding={trim}: ONNX Runtime / PyTorch, median of paired runs {statistics.median(ratios):.2f}x")
    print(" the ONNX Runtime loop at full width, by own time:")
    print("\n".join(line for line in profile_text.getvalue().splitlines()[6:] if line.strip()))


if __name__ == "__main__":
    main()
