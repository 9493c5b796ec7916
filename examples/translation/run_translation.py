#!/usr/bin/env python
"""Fine-tune a sequence-to-sequence model (T5, BART, Marian, mBART, ...) for translation on a Hub data set or your
own jsonlines files, training with ONNX Runtime.

The same command line as Hugging Face's run_translation.py, plus the ORT options of `ORTSeq2SeqTrainingArguments`
(`--use_ort`, `--inference_with_ort`, `--ort_fallback`, ...). With `--inference_with_ort --predict_with_generate`
the translations are generated in ONNX Runtime.
"""

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
from datasets import Translation
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    M2M100Tokenizer,
    MBart50Tokenizer,
    MBart50TokenizerFast,
    MBartTokenizer,
    MBartTokenizerFast,
)

from ort_trainer import ORTSeq2SeqTrainingArguments, Seq2SeqORTTrainer
from ort_trainer import example_utils as utils
from ort_trainer.metrics import sacrebleu_metrics


logger = logging.getLogger(__name__)

# Tokenizers that need the source and target languages set, and a forced first token in generation.
MULTILINGUAL_TOKENIZERS = [MBartTokenizer, MBartTokenizerFast, MBart50Tokenizer, MBart50TokenizerFast, M2M100Tokenizer]


@dataclass
class DataTrainingArguments(utils.DataPreparationArguments):
    """What data to train and evaluate on, and how to prepare it."""

    source_lang: str | None = field(default=None, metadata={"help": "Source language id, e.g. en."})
    target_lang: str | None = field(default=None, metadata={"help": "Target language id, e.g. ro."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set, e.g. wmt16."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The data set's configuration, e.g. ro-en."}
    )
    train_file: str | None = field(default=None, metadata={"help": "A jsonlines file of training pairs."})
    validation_file: str | None = field(default=None, metadata={"help": "A jsonlines file of validation pairs."})
    test_file: str | None = field(default=None, metadata={"help": "A jsonlines file of pairs to translate."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenizing."})
    max_source_length: int = field(default=1024, metadata={"help": "Longer source texts are truncated."})
    max_target_length: int = field(
        default=128, metadata={"help": "Longer target texts are truncated (and counted in a warning)."}
    )
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "`max_target_length` of validation and test, and generation's `max_length` in evaluation "
            "unless `--generation_max_length` is given. Default: `max_target_length`."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every text to its maximum length; otherwise pad each batch to its longest."},
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "Beams in evaluation and prediction (default: `--generation_num_beams`)."}
    )
    ignore_pad_token_for_loss: bool = field(
        default=True, metadata={"help": "Leave the label padding out of the loss (with `--pad_to_max_length`)."}
    )
    source_prefix: str | None = field(
        default=None,
        metadata={"help": "Text put before every source text, e.g. 'translate English to German: ' for T5."},
    )
    forced_bos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token forced first in generation, for multilingual models such as mBART-50 (its language "
            "code, e.g. ro_RO)."
        },
    )

    def __post_init__(self):
        if self.dataset_name is None and not (self.train_file or self.validation_file or self.test_file):
            raise ValueError("Give `--dataset_name`, or data files with `--train_file`/`--validation_file`.")
        if self.source_lang is None or self.target_lang is None:
            raise ValueError("Give the language pair: `--source_lang` and `--target_lang`.")
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and path.split(".")[-1] not in ("json", "jsonl"):
                raise ValueError(f"`--{name}` must be a jsonlines file (.json or .jsonl), got {path}.")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


def check_languages(raw_datasets, source_lang: str, target_lang: str) -> None:
    """Every row has a text in both languages: else name the language or the line that lacks it. Hub data sets
    declare their languages (a `Translation` feature) and are checked by that alone."""
    for split, dataset in raw_datasets.items():
        if "translation" not in dataset.column_names:
            raise ValueError(
                f"The {split} data has no `translation` column (columns: {', '.join(dataset.column_names)})."
            )
        feature = dataset.features["translation"]
        pairs = None if isinstance(feature, Translation) else dataset["translation"]
        if pairs is None:
            languages = sorted(feature.languages)
        else:
            languages = sorted({language for pair in pairs for language, text in pair.items() if text is not None})
        for flag, language in (("source_lang", source_lang), ("target_lang", target_lang)):
            if language not in languages:
                raise ValueError(
                    f"`--{flag} {language}` is not in the {split} data, whose languages are {', '.join(languages)}."
                )
        for line, pair in enumerate(pairs or [], start=1):
            missing = [language for language in (source_lang, target_lang) if not pair.get(language)]
            if missing:
                raise ValueError(f"Line {line} of the {split} data has no {missing[0]!r} text.")


def main():
    model_args, data_args, training_args, checkpoint = utils.start(DataTrainingArguments, ORTSeq2SeqTrainingArguments)
    # Multilingual models name languages with codes such as en_XX; the data's keys are the part before "_".
    source_lang, target_lang = data_args.source_lang.split("_")[0], data_args.target_lang.split("_")[0]

    # Data.
    raw_datasets = utils.load_raw_datasets(data_args, model_args)
    check_languages(raw_datasets, source_lang, target_lang)

    # Model and tokenizer.
    config = utils.load_config(model_args)
    if data_args.source_prefix is None and model_args.model_name_or_path is not None and config.model_type == "t5":
        logger.warning(
            "You're running a t5 model but didn't provide a source prefix, which is expected, e.g. with "
            "`--source_prefix 'translate English to German: ' `"
        )
    first_split = next(iter(raw_datasets.values()))
    texts = (text for pair in first_split["translation"] for text in (pair[source_lang], pair[target_lang]))
    tokenizer = utils.load_tokenizer(model_args, texts, config)
    if model_args.model_name_or_path is None:
        config.vocab_size = len(tokenizer)
    model = utils.load_model(AutoModelForSeq2SeqLM, model_args, config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if isinstance(tokenizer, tuple(MULTILINGUAL_TOKENIZERS)):
        set_multilingual_languages(model, tokenizer, data_args)
    if model.config.decoder_start_token_id is None:
        raise ValueError("The model's config has no `decoder_start_token_id`: set it in the config.")

    # Lengths the model's positions take, and generation settings (checked below): before training.
    for name in ("max_source_length", "max_target_length", "val_max_target_length"):
        setattr(data_args, name, utils.cap_length(getattr(data_args, name), tokenizer, model.config, f"--{name}"))
    max_length = training_args.generation_max_length
    max_length = data_args.val_max_target_length if max_length is None else max_length
    beams_flag = "--num_beams" if data_args.num_beams is not None else "--generation_num_beams"
    num_beams = data_args.num_beams if data_args.num_beams is not None else training_args.generation_num_beams
    if training_args.do_eval or training_args.do_predict:
        max_length = utils.cap_length(max_length, tokenizer, model.config, "--generation_max_length")

    # Preprocessing.
    prefix = data_args.source_prefix or ""
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples, max_target_length):
        inputs = [prefix + pair[source_lang] for pair in examples["translation"]]
        targets = [pair[target_lang] for pair in examples["translation"]]
        model_inputs = tokenizer(inputs, max_length=data_args.max_source_length, padding=padding, truncation=True)
        labels = tokenizer(text_target=targets, max_length=max_target_length, padding=padding, truncation=True)
        label_ids = labels["input_ids"]
        if padding == "max_length" and data_args.ignore_pad_token_for_loss:
            label_ids = [[(token if token != tokenizer.pad_token_id else -100) for token in row] for row in label_ids]
        model_inputs["labels"] = label_ids
        # Targets cut by the maximum length, counted for a warning.
        model_inputs["target_truncated"] = [
            len(ids) > max_target_length for ids in tokenizer(text_target=targets)["input_ids"]
        ]
        return model_inputs

    wanted = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    for split, asked in wanted.items():
        if asked and split not in raw_datasets:
            raise ValueError(f"No {split} data: give `--{split}_file`.")
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    target_lengths = {
        "train": data_args.max_target_length,
        "validation": data_args.val_max_target_length,
        "test": data_args.val_max_target_length,
    }
    tokenized = {}
    for split, asked in wanted.items():
        if not asked:
            continue
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            tokenized[split] = utils.cap(raw_datasets[split], limits[split]).map(
                preprocess,
                batched=True,
                fn_kwargs={"max_target_length": target_lengths[split]},
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=raw_datasets[split].column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing the {split} data",
            )
        truncated = sum(tokenized[split]["target_truncated"])
        if truncated:
            logger.warning(
                "%d target texts of the %s data are longer than %d tokens and were truncated.",
                truncated,
                split,
                target_lengths[split],
            )
        tokenized[split] = tokenized[split].remove_columns("target_truncated")

    # Metrics: sacreBLEU on the decoded texts, and the mean generated length.
    def decode(token_ids):
        token_ids = np.where(token_ids != -100, token_ids, tokenizer.pad_token_id)
        return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def compute_metrics(eval_predictions):
        predictions, labels = eval_predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
        result = sacrebleu_metrics(decode(predictions), decode(labels))
        result["gen_len"] = float(np.mean(np.count_nonzero(predictions != tokenizer.pad_token_id, axis=1)))
        return {key: round(value, 4) for key, value in result.items()}

    label_pad_token_id = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    collator = DataCollatorForSeq2Seq(
        tokenizer,
        model=model,
        label_pad_token_id=label_pad_token_id,
        pad_to_multiple_of=8 if training_args.fp16 else None,
    )
    trainer = Seq2SeqORTTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )
    if training_args.do_eval or training_args.do_predict:  # with `--generation_config`, once the trainer loaded it
        check_generation(model, max_length, num_beams, beams_flag)

    if training_args.do_train:
        utils.train(trainer, training_args, checkpoint, len(tokenized["train"]))
    if training_args.do_eval:
        utils.evaluate(trainer, {"": tokenized["validation"]}, max_length=max_length, num_beams=num_beams)
    if training_args.do_predict:
        output = trainer.predict(
            tokenized["test"], metric_key_prefix="predict", max_length=max_length, num_beams=num_beams
        )
        metrics = dict(output.metrics, predict_samples=len(tokenized["test"]))
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            with open(f"{training_args.output_dir}/generated_predictions.txt", "w", encoding="utf-8") as writer:
                writer.write("\n".join(decode(output.predictions)) + "\n")
    trainer.create_model_card(
        finetuned_from=model_args.model_name_or_path,
        tasks="translation",
        language=[source_lang, target_lang],
        dataset_tags=data_args.dataset_name,
        dataset=data_args.dataset_name,
    )


def check_generation(model, max_length: int, num_beams: int | None, beams_flag: str) -> None:
    """Generation runs only after training: its settings are checked before, with transformers' own checks."""
    if num_beams is not None and num_beams < 1:
        raise ValueError(f"`{beams_flag}` must be 1 or more, got {num_beams}. To fix: pass a positive `{beams_flag}`.")
    generation_config = copy.deepcopy(model.generation_config)
    try:  # `update` validates, as `validate` does
        generation_config.update(max_length=max_length, **({} if num_beams is None else {"num_beams": num_beams}))
        generation_config.validate()
    except ValueError as error:
        raise ValueError(
            f"Invalid generation settings: {str(error).strip().splitlines()[0]} To fix: change `{beams_flag}` or "
            "`--generation_max_length`, or the model's generation config."
        ) from error


def set_multilingual_languages(model, tokenizer, data_args) -> None:
    """mBART-style models: the tokenizer's language codes, the target language's code as the decoder's first
    token, and `--forced_bos_token` forced first in generation."""
    tokenizer.src_lang, tokenizer.tgt_lang = data_args.source_lang, data_args.target_lang
    if model.config.decoder_start_token_id is None and isinstance(tokenizer, (MBartTokenizer, MBartTokenizerFast)):
        model.config.decoder_start_token_id = tokenizer.convert_tokens_to_ids(data_args.target_lang)
    if data_args.forced_bos_token is not None:
        forced_bos_token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)
        model.config.forced_bos_token_id = model.generation_config.forced_bos_token_id = forced_bos_token_id


if __name__ == "__main__":
    utils.run(main)
