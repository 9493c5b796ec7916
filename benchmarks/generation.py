"""Generation speed: PyTorch's `generate` against the same `generate` driving ONNX Runtime sessions (encoder,
decoder, decoder with past), on a T5 of a published size with random weights, for greedy and beam search.

    python benchmarks/generation.py --model t5-small --batch_size 16 --num_beams 1 4

Prints a markdown table of sentences/s (medians of `--repeats` timed runs after a warm-up, taken in turns; the
speed-up is the median of the pairs' ratios) and checks that both
backends generate the same tokens. Random weights never emit the end token, so every sentence is
`--new_tokens` long in both backends.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, T5Config

from ort_trainer.benchmark import ARCHITECTURES, T5_SETTINGS, T5_VOCABULARY
from ort_trainer.inference.seq2seq import Seq2SeqLM


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", choices=[name for name in ARCHITECTURES if name.startswith("t5")], default="t5-small"
    )
    parser.add_argument("--vocab_size", type=int, default=T5_VOCABULARY, help="T5's vocabulary: the LM head's width.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--source_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--num_beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="On CUDA: PyTorch in fp16, ONNX Runtime graphs in fp16.")
    return parser.parse_args()


def seconds(function):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def paired_timings(pytorch, ort, repeats: int):
    """After a warm-up of each, `repeats` pairs of timed runs, PyTorch then ONNX Runtime, so that a drift in the
    machine's speed hits both: the median of each backend's times, the median of the pairs' speed-ups, and the
    last outputs."""
    pytorch(), ort()
    pairs = []
    for _ in range(repeats):
        (pytorch_seconds, expected), (ort_seconds, generated) = seconds(pytorch), seconds(ort)
        pairs.append((pytorch_seconds, ort_seconds))
    medians = [statistics.median(times) for times in zip(*pairs)]
    speed_up = statistics.median(pytorch_seconds / ort_seconds for pytorch_seconds, ort_seconds in pairs)
    return *medians, speed_up, expected, generated


def main():
    args = parse_args()
    torch.manual_seed(0)
    config = T5Config(
        **{key: value for key, value in ARCHITECTURES[args.model].items() if key != "model_type"},
        **T5_SETTINGS,
        vocab_size=args.vocab_size,
    )
    device = torch.device(args.device)
    model = AutoModelForSeq2SeqLM.from_config(config).to(device).eval()
    if args.fp16:
        model.half()
    input_ids = torch.randint(5, args.vocab_size, (args.batch_size, args.source_length), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1::2, args.source_length // 2 :] = 0  # half the rows padded, as in a real batch
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        sample = {"input_ids": input_ids, "attention_mask": attention_mask}
        onnx_model = Seq2SeqLM.load(model, sample, Path(directory), args.fp16)
        export_seconds = time.perf_counter() - start
        print(
            f"{args.model}, batch {args.batch_size}, source {args.source_length} tokens, {args.new_tokens} new "
            f"tokens, {device}, {'fp16' if args.fp16 else 'fp32'}; export and sessions: {export_seconds:.1f} s "
            f"({onnx_model.provider})\n"
        )
        print("| Search | PyTorch (sentences/s) | ONNX Runtime (sentences/s) | Speed-up | Same tokens |")
        print("|---|---|---|---|---|")
        for num_beams in args.num_beams:
            settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "num_beams": num_beams}

            def pytorch():
                with torch.no_grad():
                    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)

            def ort():
                with onnx_model.running(model):
                    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)

            pytorch_seconds, ort_seconds, speed_up, expected, generated = paired_timings(pytorch, ort, args.repeats)
            search = "greedy" if num_beams == 1 else f"beam {num_beams}"
            same = torch.equal(expected, generated)
            print(
                f"| {search} | {args.batch_size / pytorch_seconds:.1f} | {args.batch_size / ort_seconds:.1f} | "
                f"{speed_up:.2f}x | {same} |"
            )


if __name__ == "__main__":
    main()
