"""What the example scripts share: model arguments, parsing, logging, output folder checks, data loading,
tokenizers built offline, and the train / evaluate / save steps. Each script keeps only its task's code."""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, PreTrainedTokenizerFast, set_seed
from transformers import logging as transformers_logging

from .inference import ONNXExportError
from .ortmodule import ORTTrainingError
from .training_args import ORTTrainingArguments
from .transformers_compat import get_last_checkpoint


logger = logging.getLogger(__name__)

# Errors that come from what the user asked for: reported in one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, ORTTrainingError, ONNXExportError)


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained model: a Hub id or a local folder. Leave it out and give `--config_name` to train a "
            "new model from scratch."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config (Hub id, folder or .json file), if not the model's own."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    train_tokenizer: bool = field(
        default=False,
        metadata={
            "help": "Build a WordPiece tokenizer from the training text (offline, for models trained from scratch)."
        },
    )
    tokenizer_vocab_size: int = field(default=2000, metadata={"help": "Vocabulary size of `--train_tokenizer`."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to keep what is downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version: a branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token, for private models and data sets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and data sets that run their own code from the Hub."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a checkpoint whose head has another number of labels."}
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.config_name is None:
            raise ValueError("Give `--model_name_or_path`, or `--config_name` to train a new model from scratch.")
        if self.model_name_or_path is None and self.tokenizer_name is None and not self.train_tokenizer:
            raise ValueError("A model trained from scratch needs `--tokenizer_name` or `--train_tokenizer`.")
        if self.model_name_or_path is not None and self.train_tokenizer:
            raise ValueError(
                f"`--train_tokenizer` builds a new vocabulary, which the embeddings of `--model_name_or_path` "
                f"{self.model_name_or_path} do not know. To fix: drop `--train_tokenizer` (or `--model_name_or_path` "
                "to train a new model with `--config_name`)."
            )

    def hub_kwargs(self) -> dict:
        return {
            "cache_dir": self.cache_dir,
            "revision": self.model_revision,
            "token": self.token,
            "trust_remote_code": self.trust_remote_code,
        }


@dataclass
class DataPreparationArguments:
    """Options every example script shares: caching and cutting the splits for quick runs."""

    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again instead of using the cache."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N examples only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples only."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Predict the first N examples only."})


LOCK_FILE = ".ort_trainer.lock"


def run(main):
    """Run a script's `main()` holding its output folder's lock: an error in what the user asked for prints one
    line and exits 1, and an output folder this run created is removed again, so a failed run leaves the disk as it
    found it. Only what this run wrote goes: while it holds the lock, no other run writes there."""
    try:
        with _locked_output_dir(_output_dir_argument(sys.argv[1:])) as discard_output:
            try:
                main()
            except USER_ERRORS:
                discard_output()
                raise
    except USER_ERRORS as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        # Under torchrun: close the process group before exit, or its threads can abort the process at shutdown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _locked_output_dir(output_dir: Path | None):
    """Create `output_dir` if needed and hold its lock file (pid and host) while the run lasts; refuse a folder that
    another run holds, cannot be written or is a file. Yields a function that removes the folders this run
    created, with what it wrote into them. Under torchrun only rank 0 locks, and only it removes."""
    if output_dir is None or os.environ.get("RANK", "0") != "0":
        yield lambda: None
        return
    created = _make_dirs(output_dir)
    try:
        lock = _acquire_lock(output_dir)
    except BaseException:
        _remove_created(created, output_dir)
        raise
    try:
        yield lambda: _remove_created(created, output_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            (output_dir / LOCK_FILE).unlink()
        os.close(lock)


def _make_dirs(output_dir: Path) -> list:
    """Create `output_dir` and missing parents; returns the folders created, deepest first."""
    missing = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        except OSError as error:
            _remove_created(created, output_dir)
            raise _output_dir_error(output_dir, error) from error
        created.insert(0, folder)
    if not output_dir.is_dir():
        _remove_created(created, output_dir)
        raise ValueError(f"`--output_dir` {output_dir} is a file. To fix: give the path of a folder.")
    return created


def _acquire_lock(output_dir: Path) -> int:
    """An exclusive `flock` on `output_dir/LOCK_FILE`, which the kernel releases when the process ends: a lock file
    left by a run that was killed does not block the next one."""
    path = output_dir / LOCK_FILE
    while True:
        try:
            lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _output_dir_error(output_dir, error) from error
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(lock, 200).decode(errors="replace").strip() or "another process"
            os.close(lock)
            raise ValueError(
                f"`--output_dir` {output_dir} is in use by {holder} (lock file {path}). To fix: wait for that run to "
                "end, or choose another `--output_dir`."
            ) from None
        # The holder before us may have removed the file between our open and our lock: lock the current one.
        if path.exists() and os.stat(path).st_ino == os.fstat(lock).st_ino:
            break
        os.close(lock)
    os.ftruncate(lock, 0)
    os.write(lock, f"process {os.getpid()} on {socket.gethostname()}".encode())
    return lock


def _output_dir_error(output_dir: Path, error: OSError) -> ValueError:
    return ValueError(
        f"Cannot write to `--output_dir` {output_dir}: {error.strerror}. To fix: choose a folder you can write to."
    )


def _remove_created(created: list, output_dir: Path) -> None:
    """Remove the folders this run created, deepest first: the output folder with what this run wrote into it,
    parents only while empty (another run may have made its own folder in them meanwhile)."""
    for folder in created:
        if folder == output_dir:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _output_dir_argument(argv: list) -> Path | None:
    """The `--output_dir` of a command line (or of its lone .json options file), read before parsing fails."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        try:
            value = json.loads(Path(argv[0]).read_text()).get("output_dir")
        except (OSError, ValueError):
            return None
        return Path(value) if value else None
    for index, argument in enumerate(argv):
        if argument.startswith(("--output_dir=", "--output-dir=")):
            return Path(argument.split("=", 1)[1])
        if argument in ("--output_dir", "--output-dir") and index + 1 < len(argv):
            return Path(argv[index + 1])
    return None


def start(data_arguments_class, training_arguments_class=ORTTrainingArguments):
    """What every script does first: parse its options (model, data, training), set up logging, find the
    checkpoint to resume from, seed. Returns the three argument objects and the checkpoint."""
    model_args, data_args, training_args = parse_arguments(
        ModelArguments, data_arguments_class, training_arguments_class
    )
    check_counts(data_args, training_args)
    setup_logging(training_args)
    checkpoint = last_checkpoint(training_args)
    set_seed(training_args.seed)
    return model_args, data_args, training_args, checkpoint


def parse_arguments(*dataclass_types):
    """Command-line flags, or one .json file holding the same options."""
    parser = HfArgumentParser(dataclass_types)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    if len(sys.argv) > 2 and sys.argv[1].endswith(".json"):  # argparse would drop the file without a word
        raise ValueError(
            f"An options file must come alone, and {sys.argv[1]} came with {' '.join(sys.argv[2:])}. To fix: put "
            "those options into the file, or give every option on the command line."
        )
    return parser.parse_args_into_dataclasses()


def check_counts(data_args, training_args) -> None:
    """Counts that must be positive, which `Trainer` would otherwise divide by or sample with after setting up."""
    data_counts = ("max_train_samples", "max_eval_samples", "max_predict_samples")
    counts = {name: getattr(data_args, name) for name in data_counts}
    for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
        counts[name] = getattr(training_args, name)
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be 1 or more, got {value}. To fix: pass a positive `--{name}`.")


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers_logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    for library_logger in (logging.getLogger("ort_trainer"), logger):
        library_logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers_logging.set_verbosity(level)
    transformers_logging.enable_default_handler()
    transformers_logging.enable_explicit_format()
    logger.warning(
        "Process rank: %s, device: %s, n_gpu: %s, distributed: %s, fp16: %s, bf16: %s, ORT training: %s",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
        training_args.fp16,
        training_args.bf16,
        training_args.use_ort,
    )


def last_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from in `output_dir`; refuses to train into a non-empty folder otherwise."""
    output_dir = Path(training_args.output_dir)
    if not (training_args.do_train and output_dir.is_dir()) or training_args.overwrite_output_dir:
        return None
    checkpoint = get_last_checkpoint(str(output_dir))
    if checkpoint is None and any(path.name != LOCK_FILE for path in output_dir.iterdir()):
        raise ValueError(
            f"Output directory ({output_dir}) already exists and is not empty. "
            "To fix: pass `--overwrite_output_dir`, or choose another `--output_dir`."
        )
    if checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info("Checkpoint detected, resuming training at %s.", checkpoint)
    return checkpoint


def load_raw_datasets(data_args, model_args, splits=("train", "validation", "test")) -> datasets.DatasetDict:
    """A Hub data set (`--dataset_name`) or local csv/json files (`--train_file` ...), checked before use."""
    if getattr(data_args, "dataset_name", None):
        return datasets.load_dataset(
            data_args.dataset_name,
            getattr(data_args, "dataset_config_name", None),
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    data_files = {
        split: getattr(data_args, f"{split}_file") for split in splits if getattr(data_args, f"{split}_file")
    }
    extensions = set()
    for split, path in data_files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"`--{split}_file` {path} does not exist or is not a file.")
        if not os.access(path, os.R_OK):
            raise ValueError(f"`--{split}_file` {path} cannot be read: check its permissions.")
        if Path(path).stat().st_size == 0:
            raise ValueError(f"`--{split}_file` {path} is empty.")
        extensions.add(Path(path).suffix.lstrip("."))
    if len(extensions) != 1 or extensions - {"csv", "json", "jsonl"}:
        raise ValueError(f"Data files must all be csv or all json/jsonl, got {', '.join(sorted(extensions))}.")
    extension = extensions.pop().replace("jsonl", "json")
    try:
        raw = datasets.load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        cause = error.__cause__ or error
        raise ValueError(f"Could not read the {extension} data files: {str(cause).splitlines()[0]}") from error
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise ValueError(f"`--{split}_file` {data_files[split]} has no rows.")
    return raw


def cap(dataset, max_samples: int | None):
    """The first `max_samples` rows (all when None), for quick runs."""
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def load_config(model_args, **config_kwargs):
    name = model_args.config_name or model_args.model_name_or_path
    return AutoConfig.from_pretrained(name, **config_kwargs, **model_args.hub_kwargs())


def load_tokenizer(model_args, texts, config, **tokenizer_kwargs):
    """The model's (or `--tokenizer_name`'s) tokenizer, or with `--train_tokenizer` a WordPiece one built from
    `texts`, an iterable of strings (no download needed), for inputs as long as `config` allows."""
    if model_args.train_tokenizer:
        max_length = max_positions(config) or 512
        seq2seq = getattr(config, "is_encoder_decoder", False)
        return train_wordpiece_tokenizer(texts, model_args.tokenizer_vocab_size, max_length, seq2seq)
    name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name, **tokenizer_kwargs, **model_args.hub_kwargs())
    # transformers builds a tokenizer without a vocabulary from a folder that has no tokenizer files.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise ValueError(
            f"The tokenizer of {name} has no vocabulary, only its {len(tokenizer)} special tokens: {name} has no "
            "tokenizer files. To fix: pass `--tokenizer_name` with the model's tokenizer, or save it into that folder."
        )
    return tokenizer


# Models that number positions from the padding id + 1, so that many fewer tokens fit.
OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


def max_positions(config) -> int | None:
    """How many tokens the model's position embeddings hold (None: positions are not limited, e.g. T5's)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions and config.model_type in OFFSET_POSITION_MODELS:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def cap_length(requested: int | None, tokenizer, config, flag: str) -> int:
    """`requested` (None: the most the model takes), capped to what the tokenizer and the model's positions take,
    with a warning, as Hugging Face's scripts do: longer inputs would index past the position embeddings."""
    if requested is not None and requested < 1:
        raise ValueError(f"`{flag}` must be 1 or more, got {requested}. To fix: pass a positive `{flag}`.")
    limit = min(tokenizer.model_max_length, max_positions(config) or tokenizer.model_max_length)
    if requested is None or requested <= limit:
        return limit if requested is None else requested
    logger.warning("`%s %d` is more than the model takes (%d tokens): using %d.", flag, requested, limit, limit)
    return limit


def train_wordpiece_tokenizer(
    texts, vocab_size: int, model_max_length: int, seq2seq: bool = False
) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer for `texts`: its vocabulary is every character (alone and as a
    `##` continuation) plus the most frequent words, ties broken alphabetically. Unlike `tokenizers`' trainer, whose
    ties depend on hashing, it is the same in every process, which distributed ranks need. The special tokens have
    ids 0 to 4 ([PAD], [UNK], [CLS], [SEP], [MASK]); for `seq2seq` models, texts end with [SEP] as their
    end-of-sequence token and [CLS] is the beginning-of-sequence token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = sorted({character for word in counts for character in word})
    pieces = special + characters + [f"##{character}" for character in characters]
    words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(word) > 1]
    vocab = {token: index for index, token in enumerate(pieces + words[: max(vocab_size - len(pieces), 0)])}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    if seq2seq:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A [SEP]", pair="$A [SEP] $B:1 [SEP]:1", special_tokens=[("[SEP]", vocab["[SEP]"])]
        )
        roles = {"eos_token": "[SEP]", "bos_token": "[CLS]", "model_input_names": ["input_ids", "attention_mask"]}
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        roles = {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        **roles,
    )


def load_model(model_class, model_args, config):
    """The pretrained model, or a new one from `config` when no `--model_name_or_path` is given."""
    if model_args.model_name_or_path is None:
        logger.info("Training a new %s from scratch.", model_class.__name__)
        return model_class.from_config(config)
    return model_class.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **model_args.hub_kwargs(),
    )


def train(trainer, training_args, checkpoint: str | None, train_samples: int) -> None:
    """Train (resuming where asked), save model and tokenizer, and record the train metrics."""
    resume = training_args.resume_from_checkpoint or checkpoint
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    metrics = dict(result.metrics, train_samples=train_samples)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()


def evaluate(trainer, eval_datasets: dict, metric_prefix="eval", **evaluate_kwargs) -> dict:
    """Evaluate each data set, keyed by the suffix of its metric names ("" for none, "mm" for MNLI mismatched);
    `evaluate_kwargs` go to `trainer.evaluate` (e.g. generation's `max_length` and `num_beams`)."""
    all_metrics = {}
    for suffix, dataset in eval_datasets.items():
        metrics = trainer.evaluate(eval_dataset=dataset, **evaluate_kwargs)
        metrics[f"{metric_prefix}_samples"] = len(dataset)
        if suffix:
            metrics = {f"{key}_{suffix}": value for key, value in metrics.items()}
        all_metrics.update(metrics)
    trainer.log_metrics(metric_prefix, all_metrics)
    trainer.save_metrics(metric_prefix, all_metrics)
    return all_metrics
