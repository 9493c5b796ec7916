"""Shared example helpers: the tokenizer built offline, and the output folder's lock."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ort_trainer.example_utils import LOCK_FILE, _locked_output_dir, train_wordpiece_tokenizer


TEXTS = ["the film was not bad", "the plot was good but the ending was dull", "a fresh and funny film"]


def test_built_tokenizer_is_the_same_in_every_process():
    """Distributed ranks each build the tokenizer: their vocabularies must agree."""
    script = (
        "import json; from ort_trainer.example_utils import train_wordpiece_tokenizer; "
        f"print(json.dumps(train_wordpiece_tokenizer({TEXTS!r}, 100, 64).get_vocab(), sort_keys=True))"
    )
    vocabularies = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert vocabularies[0] == vocabularies[1]
    assert json.loads(vocabularies[0]) == train_wordpiece_tokenizer(TEXTS, 100, 64).get_vocab()


def test_built_tokenizer_splits_unknown_words_into_pieces():
    tokenizer = train_wordpiece_tokenizer(TEXTS, 100, 64)
    assert tokenizer.tokenize("The film was fun") == ["the", "film", "was", "f", "##u", "##n"]
    encoded = tokenizer("the film", "was good")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == [
        "[CLS]",
        "the",
        "film",
        "[SEP]",
        "was",
        "good",
        "[SEP]",
    ]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert tokenizer.model_max_length == 64


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`, with the bytes of the files: to compare a folder byte for byte."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


def hold_lock(output_dir: Path) -> subprocess.Popen:
    """Another process holding `output_dir`'s lock (and writing a file there) until its stdin closes."""
    script = (
        "import sys; from pathlib import Path; from ort_trainer.example_utils import _locked_output_dir\n"
        f"with _locked_output_dir(Path({str(output_dir)!r})):\n"
        f"    Path({str(output_dir / 'theirs.txt')!r}).write_text('written by the other run')\n"
        "    print('locked', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_output_dir_held_by_another_run_is_refused_naming_it_and_kept(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        before = snapshot(out)
        with pytest.raises(ValueError) as raised:
            with _locked_output_dir(out):
                pass
        assert str(raised.value) == (
            f"`--output_dir` {out} is in use by process {holder.pid} on {socket.gethostname()} (lock file "
            f"{out / LOCK_FILE}). To fix: wait for that run to end, or choose another `--output_dir`."
        )
        assert snapshot(out) == before
    finally:
        holder.communicate("")
    assert (out / "theirs.txt").read_text() == "written by the other run" and not (out / LOCK_FILE).exists()


def test_lock_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    holder.kill()
    holder.wait()
    assert (out / LOCK_FILE).exists()  # a killed run cannot remove its lock file; the kernel released its lock
    with _locked_output_dir(out):
        assert (out / LOCK_FILE).read_text() == f"process {os.getpid()} on {socket.gethostname()}"
    assert sorted(path.name for path in out.iterdir()) == ["theirs.txt"]


def test_failed_run_removes_only_the_folders_it_created(tmp_path):
    out = tmp_path / "new" / "parent" / "out"
    with _locked_output_dir(out) as discard_output:
        (out / "checkpoint-1").mkdir()
        (tmp_path / "new" / "parent" / "other-run").mkdir()  # another run's folder beside ours, made meanwhile
        discard_output()
    assert not out.exists() and [path.name for path in (tmp_path / "new" / "parent").iterdir()] == ["other-run"]
