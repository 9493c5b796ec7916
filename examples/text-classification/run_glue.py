#!/usr/bin/env python
"""Fine-tune a sequence classifier on GLUE or on your own csv/json files, training with ONNX Runtime.

The same command line as Hugging Face's run_glue.py, plus the ORT options of `ORTTrainingArguments`
(`--use_ort`, `--inference_with_ort`, `--ort_fallback`, ...).
"""

from dataclasses import dataclass, field

import datasets
import numpy as np
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, EvalPrediction

from ort_trainer import ORTTrainer
from ort_trainer import example_utils as utils
from ort_trainer.metrics import GLUE_TASKS, glue_metrics


TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


@dataclass
class DataTrainingArguments(utils.DataPreparationArguments):
    """What data to train and evaluate on, and how to prepare it."""

    task_name: str | None = field(default=None, metadata={"help": f"A GLUE task: {', '.join(GLUE_TASKS)}."})
    dataset_name: str = field(default="nyu-mll/glue", metadata={"help": "The Hub data set holding the GLUE tasks."})
    train_file: str | None = field(default=None, metadata={"help": "A csv or json file of training data."})
    validation_file: str | None = field(default=None, metadata={"help": "A csv or json file of validation data."})
    test_file: str | None = field(default=None, metadata={"help": "A csv or json file of data to predict."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated, shorter ones padded."})
    pad_to_max_length: bool = field(
        default=True,
        metadata={"help": "Pad every input to `max_seq_length`; otherwise pad each batch to its longest."},
    )

    def __post_init__(self):
        has_files = self.train_file is not None or self.validation_file is not None or self.test_file is not None
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"Unknown `--task_name` {self.task_name}: choose one of {', '.join(TASK_TO_KEYS)}.")
            if has_files:
                raise ValueError("Give either `--task_name` or data files (`--train_file` ...), not both.")
        elif not has_files:
            raise ValueError("Give a GLUE `--task_name`, or data files with `--train_file`/`--validation_file`.")


def text_columns(task_name, column_names):
    """The one or two text columns: GLUE's own, else sentence1/sentence2, else the first non-label columns."""
    if task_name is not None:
        return TASK_TO_KEYS[task_name]
    if "sentence1" in column_names and "sentence2" in column_names:
        return "sentence1", "sentence2"
    texts = [name for name in column_names if name not in ("label", "idx")]
    if not texts:
        raise ValueError(f"No text column found: the data has only {', '.join(column_names)}.")
    return (texts[0], texts[1]) if len(texts) >= 2 else (texts[0], None)


def check_cells(raw_datasets, columns):
    """Every row has a text and a label (the test data may leave labels out), each a single value: an empty
    label cell would otherwise turn the task into regression, an empty text fail in the tokenizer."""
    for split, dataset in raw_datasets.items():
        for column in [name for name in columns if name in dataset.column_names]:
            if split == "test" and column == "label" and dataset.unique("label") == [None]:
                continue
            if not isinstance(dataset.features[column], (datasets.Value, datasets.ClassLabel)):
                raise ValueError(
                    f"The `{column}` column of the {split} data holds {type(dataset[0][column]).__name__} values, "
                    "not single values. To fix: give one string or number per row."
                )
            values = list(dataset[column])
            if None in values:
                raise ValueError(
                    f"Row {values.index(None) + 1} of the {split} data has no `{column}`. To fix: fill in that cell, "
                    "or remove the row."
                )


def main():
    model_args, data_args, training_args, checkpoint = utils.start(DataTrainingArguments)

    # Data: a GLUE task from the Hub, or local files.
    if data_args.task_name is not None:
        raw_datasets = datasets.load_dataset(
            data_args.dataset_name, data_args.task_name, cache_dir=model_args.cache_dir, token=model_args.token
        )
    else:
        data_args.dataset_name = None
        raw_datasets = utils.load_raw_datasets(data_args, model_args)
    labelled_split = "train" if "train" in raw_datasets else "validation"
    if "label" not in raw_datasets[labelled_split].column_names:
        raise ValueError(
            f"The {labelled_split} data has no `label` column (columns: "
            f"{', '.join(raw_datasets[labelled_split].column_names)})."
        )

    sentence1_key, sentence2_key = text_columns(data_args.task_name, raw_datasets[labelled_split].column_names)
    check_cells(raw_datasets, [key for key in (sentence1_key, sentence2_key, "label") if key])

    # Labels: classification or regression, from GLUE or from the data.
    label_feature = raw_datasets[labelled_split].features["label"]
    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
        label_list = None if is_regression else label_feature.names
    else:
        is_regression = label_feature.dtype in ("float32", "float64")
        # Label names are strings in a config (transformers validates label2id's keys as such).
        label_list = (
            None if is_regression else [str(label) for label in sorted(raw_datasets[labelled_split].unique("label"))]
        )
    num_labels = 1 if is_regression else len(label_list)

    # Model and tokenizer.
    config = utils.load_config(model_args, num_labels=num_labels, finetuning_task=data_args.task_name)
    training_texts = (
        text for key in (sentence1_key, sentence2_key) if key for text in raw_datasets[labelled_split][key]
    )
    tokenizer = utils.load_tokenizer(model_args, training_texts, config)
    if model_args.model_name_or_path is None:
        config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    model = utils.load_model(AutoModelForSequenceClassification, model_args, config)
    if label_list is not None:
        model.config.label2id = {label: index for index, label in enumerate(label_list)}
        model.config.id2label = {index: label for label, index in model.config.label2id.items()}
    label_to_id = None if is_regression or data_args.task_name else model.config.label2id

    # Preprocessing.
    for split in ("validation", "test"):
        if label_to_id is not None and split in raw_datasets and "label" in raw_datasets[split].column_names:
            labels = {str(label) for label in raw_datasets[split].unique("label") if label is not None}
            unseen = labels - set(label_to_id) - {"-1"}
            if unseen:
                raise ValueError(f"`--{split}_file` has labels never seen in training: {', '.join(sorted(unseen))}.")
    max_seq_length = utils.cap_length(data_args.max_seq_length, tokenizer, model.config, "--max_seq_length")
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples):
        texts = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if label_to_id is not None and "label" in examples:
            result["label"] = [label_to_id.get(str(label), -1) for label in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess, batched=True, load_from_cache_file=not data_args.overwrite_cache, desc="Tokenizing"
        )
    if label_to_id is not None:  # a column of string labels keeps its type: its ids come back as strings
        raw_datasets = datasets.DatasetDict(
            {
                split: dataset.cast_column("label", datasets.Value("int64"))
                if "label" in dataset.column_names
                else dataset
                for split, dataset in raw_datasets.items()
            }
        )

    train_dataset = utils.cap(raw_datasets["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_splits = (
        {"": "validation_matched", "mm": "validation_mismatched"}
        if data_args.task_name == "mnli"
        else {"": "validation"}
    )
    predict_splits = {"": "test_matched", "mm": "test_mismatched"} if data_args.task_name == "mnli" else {"": "test"}
    for wanted, splits in ((training_args.do_eval, eval_splits), (training_args.do_predict, predict_splits)):
        missing = [split for split in splits.values() if wanted and split not in raw_datasets]
        if missing:
            raise ValueError(f"No {missing[0]} data: give `--{missing[0].split('_')[0]}_file`.")
    eval_datasets = (
        {suffix: utils.cap(raw_datasets[split], data_args.max_eval_samples) for suffix, split in eval_splits.items()}
        if training_args.do_eval
        else {}
    )
    predict_datasets = (
        {
            suffix: utils.cap(raw_datasets[split], data_args.max_predict_samples)
            for suffix, split in predict_splits.items()
        }
        if training_args.do_predict
        else {}
    )

    # Metrics.
    def compute_metrics(prediction: EvalPrediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        return glue_metrics(data_args.task_name, predictions, prediction.label_ids)

    trainer = ORTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=next(iter(eval_datasets.values()), None),
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=None if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
    )

    if training_args.do_train:
        utils.train(trainer, training_args, checkpoint, len(train_dataset))
    if training_args.do_eval:
        utils.evaluate(trainer, eval_datasets)
    if training_args.do_predict:
        for suffix, dataset in predict_datasets.items():
            dataset = dataset.remove_columns([name for name in ("label",) if name in dataset.column_names])
            logits = trainer.predict(dataset, metric_key_prefix="predict").predictions
            predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
            task = data_args.task_name or "dataset"
            name = f"predict_results_{task}{'_' + suffix if suffix else ''}.txt"
            if trainer.is_world_process_zero():
                with open(f"{training_args.output_dir}/{name}", "w") as writer:
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(predictions):
                        value = f"{item:.3f}" if is_regression else model.config.id2label[int(item)]
                        writer.write(f"{index}\t{value}\n")
    trainer.create_model_card(finetuned_from=model_args.model_name_or_path, tasks="text-classification")


if __name__ == "__main__":
    utils.run(main)
