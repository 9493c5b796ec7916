"""Shared example helpers."""

import json
import subprocess
import sys

from ort_trainer.example_utils import train_wordpiece_tokenizer

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
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["[CLS]", "the", "film", "[SEP]", "was", "good", "[SEP]"]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert tokenizer.model_max_length == 64
