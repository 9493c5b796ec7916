"""Trains a tiny BERT with ORTTrainer and writes what happened to <output_dir>/result.json; the distributed tests
launch it with torchrun. Arguments: output_dir, per-device batch size, use_ort (1/0), a step at which rank 1
dies (0: never), a checkpoint to resume from, `--ort_backend`."""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import tiny_dataset, tiny_model  # noqa: E402

from ort_trainer import ORTTrainer, ORTTrainingArguments, compile_backend  # noqa: E402
from ort_trainer.ortmodule import ortmodule_status  # noqa: E402


class DieAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main(output_dir, batch_size, use_ort="1", die_at_step="0", resume=None, backend="auto"):
    args = ORTTrainingArguments(
        use_ort=use_ort == "1",
        ort_backend=backend,
        output_dir=output_dir,
        per_device_train_batch_size=int(batch_size),
        per_device_eval_batch_size=4,
        max_steps=8,
        learning_rate=1e-3,
        seed=0,
        report_to=[],
        use_cpu=True,
        ort_fallback="error",
        logging_steps=1,
        save_strategy="steps",
        save_steps=4,
        disable_tqdm=True,
        inference_with_ort=True,
    )
    data = tiny_dataset("bert", size=64)
    callbacks = [DieAtStep(int(die_at_step))] if int(die_at_step) else []
    trainer = ORTTrainer(
        model=tiny_model("bert"),
        args=args,
        train_dataset=data,
        eval_dataset=data[:24],
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume or None)
    metrics = trainer.evaluate()
    trainer.args.inference_with_ort = False  # the same evaluation in PyTorch, for comparison
    pytorch_metrics = trainer.evaluate()
    wrapped = trainer.model_wrapped
    if args.training_backend()[0] == "compile":
        ran = "onnxruntime" if compile_backend.stats.session_runs > 0 else "pytorch"
        graphs = compile_backend.stats.graphs_built
    else:
        ran, graphs = ortmodule_status(trainer.accelerator.unwrap_model(wrapped)).backend, 0
    if trainer.is_world_process_zero():
        result = {
            "world_size": args.world_size,
            "wrapper": type(wrapped).__name__,
            "inner": type(trainer.accelerator.unwrap_model(wrapped)).__name__,
            "backend": ran,
            "graphs_exported": compile_backend.stats.graphs_exported,
            "graphs": graphs,
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "metrics": metrics,
            "pytorch_metrics": pytorch_metrics,
            "weights": {name: value.tolist() for name, value in trainer.model.classifier.state_dict().items()},
        }
        Path(output_dir, "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else its threads can abort the process at shutdown
