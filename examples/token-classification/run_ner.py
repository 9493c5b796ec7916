#!/usr/bin/env python
"""Fine-tune a token classifier (NER, POS, chunking) on a Hub data set or your own json/csv files, training with
ONNX Runtime.

The same command line as Hugging Face's run_ner.py, plus the ORT options of `ORTTrainingArguments`
(`--use_ort`, `--inference_with_ort`, `--ort_fallback`, ...).
"""

import logging
from dataclasses import dataclass, field

import numpy as np
from datasets import ClassLabel, Sequence
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from ort_trainer import ORTTrainer
from ort_trainer import example_utils as utils
from ort_trainer.metrics import seqeval_metrics


logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments(utils.DataPreparationArguments):
    """What data to train and evaluate on, and how to prepare it."""

    task_name: str = field(default="ner", metadata={"help": "The task (ner, pos, chunk), used in file names."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set, e.g. conll2003."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The data set's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "A json or csv file of training data."})
    validation_file: str | None = field(default=None, metadata={"help": "A json or csv file of validation data."})
    test_file: str | None = field(default=None, metadata={"help": "A json or csv file of data to predict."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "The column of word lists (default: `tokens`, else the first column)."}
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "The column of tag lists (default: `<task_name>_tags`, else the second column)."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Longer inputs are truncated (words cut off are reported). Default: the model's."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every input to `max_seq_length`; otherwise pad each batch to its longest."},
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "Label every sub-word piece of a word (B- becomes I- after the first), not only the first."},
    )
    return_entity_level_metrics: bool = field(
        default=False, metadata={"help": "Report precision, recall and F1 of each entity type too."}
    )

    def __post_init__(self):
        if self.dataset_name is None and not (self.train_file or self.validation_file or self.test_file):
            raise ValueError("Give `--dataset_name`, or data files with `--train_file`/`--validation_file`.")


def column_names(data_args, columns):
    text = data_args.text_column_name or ("tokens" if "tokens" in columns else columns[0])
    label = data_args.label_column_name or (
        f"{data_args.task_name}_tags"
        if f"{data_args.task_name}_tags" in columns
        else columns[1 if len(columns) > 1 else 0]
    )
    for kind, name in (("text", text), ("label", label)):
        if name not in columns:
            raise ValueError(f"No {kind} column `{name}` in the data (columns: {', '.join(columns)}).")
    return text, label


def check_rows(raw_datasets, text_column, label_column, label_list):
    """Every row has as many tags as words, and every tag is a known one: else name the row."""
    for split, dataset in raw_datasets.items():
        if label_column not in dataset.column_names:
            continue
        for row, (words, tags) in enumerate(zip(dataset[text_column], dataset[label_column])):
            if len(words) != len(tags):
                raise ValueError(f"Row {row} of the {split} data has {len(words)} words but {len(tags)} tags.")
            unknown = [tag for tag in tags if tag not in label_list]
            if unknown:
                raise ValueError(
                    f"Row {row} of the {split} data has tag {unknown[0]!r}, which the training labels "
                    f"({', '.join(map(str, label_list))}) do not have."
                )


def align_labels(word_ids, tags, label_to_id, b_to_i, label_all_tokens):
    """One label per sub-word piece: the word's tag on its first piece; on the others the tag (B- as I-) with
    `label_all_tokens`, else -100; -100 on special tokens."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(label_to_id[tags[word]])
        else:
            labels.append(b_to_i[label_to_id[tags[word]]] if label_all_tokens else -100)
        previous = word
    return labels


def main():
    model_args, data_args, training_args, checkpoint = utils.start(DataTrainingArguments)

    # Data.
    raw_datasets = utils.load_raw_datasets(data_args, model_args)
    labelled_split = "train" if "train" in raw_datasets else "validation"
    features = raw_datasets[labelled_split].features
    text_column, label_column = column_names(data_args, raw_datasets[labelled_split].column_names)

    # Labels: the data set's ClassLabel names, else the sorted tags seen in training.
    tag_feature = features[label_column]
    if isinstance(tag_feature, Sequence) and isinstance(tag_feature.feature, ClassLabel):
        label_list = tag_feature.feature.names
        raw_datasets = raw_datasets.map(
            lambda row: {label_column: [label_list[tag] for tag in row[label_column]]}, desc="Tag names"
        )
    else:
        label_list = sorted({tag for tags in raw_datasets[labelled_split][label_column] for tag in tags})
    check_rows(raw_datasets, text_column, label_column, label_list)
    label_to_id = {label: index for index, label in enumerate(label_list)}
    # For --label_all_tokens: the I- label that continues each B- label.
    b_to_i = [
        label_to_id.get(f"I-{label[2:]}", index) if label.startswith("B-") else index
        for index, label in enumerate(label_list)
    ]

    # Model and tokenizer.
    config = utils.load_config(
        model_args,
        num_labels=len(label_list),
        finetuning_task=data_args.task_name,
        label2id=label_to_id,
        id2label=dict(enumerate(label_list)),
    )
    words = (" ".join(row) for row in raw_datasets[labelled_split][text_column])
    tokenizer = utils.load_tokenizer(
        model_args, words, config, add_prefix_space=config.model_type in {"roberta", "gpt2", "bloom"}
    )
    if not tokenizer.is_fast:
        raise ValueError(
            f"run_ner.py aligns labels with a fast tokenizer's word ids, and {type(tokenizer).__name__} is slow. "
            "To fix: use a model that has a fast tokenizer (tokenizer.json)."
        )
    if model_args.model_name_or_path is None:
        config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    model = utils.load_model(AutoModelForTokenClassification, model_args, config)

    # Preprocessing.
    max_seq_length = utils.cap_length(data_args.max_seq_length, tokenizer, model.config, "--max_seq_length")
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize(examples):
        encoded = tokenizer(
            examples[text_column],
            padding=padding,
            truncation=True,
            max_length=max_seq_length,
            is_split_into_words=True,
        )
        # Which word each piece belongs to (-1: special token), to write one tag per word and count cut words.
        encoded["word_ids"] = [
            [-1 if word is None else word for word in encoded.word_ids(index)]
            for index in range(len(examples[text_column]))
        ]
        if label_column in examples:
            encoded["labels"] = [
                align_labels(encoded.word_ids(index), tags, label_to_id, b_to_i, data_args.label_all_tokens)
                for index, tags in enumerate(examples[label_column])
            ]
        return encoded

    with training_args.main_process_first(desc="dataset map pre-processing"):
        tokenized = raw_datasets.map(
            tokenize, batched=True, load_from_cache_file=not data_args.overwrite_cache, desc="Tokenizing"
        )
    for split in tokenized:
        cut = sum(
            len(words) - len(set(ids) - {-1})
            for words, ids in zip(tokenized[split][text_column], tokenized[split]["word_ids"])
        )
        if cut:
            logger.warning(
                "%d words of the %s data were cut off by `--max_seq_length %d`; they are tagged O in predictions.",
                cut,
                split,
                max_seq_length,
            )

    wanted = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    for split, asked in wanted.items():
        if asked and split not in tokenized:
            raise ValueError(f"No {split} data: give `--{split}_file`.")
    train_dataset = utils.cap(tokenized["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = utils.cap(tokenized["validation"], data_args.max_eval_samples) if training_args.do_eval else None

    # Metrics: seqeval over the first piece of each word.
    def tag_sequences(predictions, label_ids):
        predicted, reference = [], []
        for row_predictions, row_labels in zip(predictions, label_ids):
            keep = row_labels != -100
            predicted.append([label_list[p] for p in row_predictions[keep]])
            reference.append([label_list[label] for label in row_labels[keep]])
        return predicted, reference

    def compute_metrics(prediction):
        predicted, reference = tag_sequences(np.argmax(prediction.predictions, axis=2), prediction.label_ids)
        return seqeval_metrics(predicted, reference, entity_level=data_args.return_entity_level_metrics)

    collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    trainer = ORTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=collator,
    )

    if training_args.do_train:
        utils.train(trainer, training_args, checkpoint, len(train_dataset))
    if training_args.do_eval:
        utils.evaluate(trainer, {"": eval_dataset})
    if training_args.do_predict:
        predict_dataset = utils.cap(tokenized["test"], data_args.max_predict_samples)
        output = trainer.predict(predict_dataset, metric_key_prefix="predict")
        trainer.log_metrics("predict", output.metrics)
        trainer.save_metrics("predict", output.metrics)
        if trainer.is_world_process_zero():
            write_predictions(training_args.output_dir, predict_dataset, output.predictions, text_column, label_list)
    trainer.create_model_card(finetuned_from=model_args.model_name_or_path, tasks="token-classification")


def write_predictions(output_dir, dataset, logits, text_column, label_list):
    """predictions.txt in CoNLL layout: one `word tag` line per word, a blank line between sentences. Words cut
    off by `--max_seq_length` are written too, tagged O."""
    predicted = np.argmax(logits, axis=2)
    with open(f"{output_dir}/predictions.txt", "w") as writer:
        for row, (words, word_ids) in enumerate(zip(dataset[text_column], dataset["word_ids"])):
            tags = ["O"] * len(words)
            for position, word in reversed(list(enumerate(word_ids))):  # the first piece of a word wins
                if word >= 0:
                    tags[word] = label_list[predicted[row][position]]
            writer.writelines(f"{word} {tag}\n" for word, tag in zip(words, tags))
            writer.write("\n")


if __name__ == "__main__":
    utils.run(main)
