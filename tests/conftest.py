"""What the tests share: the arguments of a short, quiet, deterministic CPU run, written into pytest's temporary
folder."""

import pytest

from ort_trainer import ORTTrainingArguments


# The keywords every test run shares; each test adds what it is about.
CPU_RUN = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    learning_rate=1e-3,
    seed=0,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    save_strategy="no",
)


@pytest.fixture
def cpu_args(tmp_path):
    """`cpu_args(name, **overrides)`: arguments of an ORT run into `tmp_path / name` that fails instead of falling
    back to PyTorch; `args_class` picks another `TrainingArguments` class."""

    def make(name: str = "out", args_class=ORTTrainingArguments, **overrides):
        values = CPU_RUN | {"output_dir": str(tmp_path / name)}
        if issubclass(args_class, ORTTrainingArguments):
            values["ort_fallback"] = "error"
        return args_class(**(values | overrides))

    return make
