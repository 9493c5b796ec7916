"""Generates the shipped NER data set in CoNLL-style json lines ({"tokens": [...], "ner_tags": [...]}, BIO tags
for PER, ORG, LOC and MISC): multi-token entities, entities at the start and end of sentences, and ambiguous words
whose tag only the context gives ("Jordan said" is a person, "flew to Jordan" a place, "an apple" no entity).
Deterministic; rerun to regenerate the files."""

import json
import random
from pathlib import Path


FIRST = ["John", "Maria", "Ahmed", "Li", "Sofia", "Jordan", "Paris", "Grace", "Omar", "Elena", "Victor", "Chen"]
LAST = ["Smith", "Garcia", "Khan", "Wei", "Rossi", "Washington", "Ford", "Turner", "Novak", "Okafor", "Berg", "Silva"]
ORGS = [
    ["Apple"],
    ["Amazon"],
    ["Ford"],
    ["United", "Nations"],
    ["Bank", "of", "England"],
    ["Red", "Cross"],
    ["Acme", "Corporation"],
    ["Reuters"],
    ["World", "Health", "Organization"],
    ["Siemens"],
    ["Real", "Madrid"],
]
LOCS = [
    ["Paris"],
    ["Jordan"],
    ["Washington"],
    ["New", "York"],
    ["Berlin"],
    ["Lagos"],
    ["Amazon", "basin"],
    ["Turkey"],
    ["Rio", "de", "Janeiro"],
    ["Kyoto"],
    ["Lake", "Victoria"],
    ["Chile"],
]
MISC = [
    ["French"],
    ["German"],
    ["Olympic", "Games"],
    ["World", "Cup"],
    ["Christmas"],
    ["Nobel", "Prize"],
    ["Chilean"],
    ["Turkish"],
]
# Words that are entities elsewhere, used here as plain words.
PLAIN = [["an", "apple"], ["the", "turkey"], ["a", "ford", "across", "the", "river"], ["the", "victor"]]


def person(rng):
    return [rng.choice(FIRST), rng.choice(LAST)] if rng.random() < 0.8 else [rng.choice(LAST)]


TEMPLATES = [
    "{PER} visited {LOC} last week .",
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened a new office in {LOC} .",
    "{PER} said {ORG} would sign the deal .",
    "She flew to {LOC} .",
    "{LOC} is cold in winter .",
    "The {MISC} team beat {ORG} on Sunday .",
    "{PER} won the {MISC} .",
    "According to {ORG} , {PER} will leave {LOC} .",
    "{PER} and {PER} met in {LOC} during the {MISC} .",
    "They ate {PLAIN} before the {MISC} .",
    "{PER} bought {PLAIN} in {LOC} .",
    "Officials in {LOC} praised {ORG} .",
    "The report by {ORG} was written by {PER}",
    "{MISC} tourists crowded {LOC}",
]


def sentence(rng):
    tokens, tags = [], []
    for word in rng.choice(TEMPLATES).split():
        kind = word[1:-1] if word.startswith("{") else None
        if kind is None:
            tokens.append(word)
            tags.append("O")
            continue
        words = {
            "PER": person(rng),
            "ORG": rng.choice(ORGS),
            "LOC": rng.choice(LOCS),
            "MISC": rng.choice(MISC),
            "PLAIN": rng.choice(PLAIN),
        }[kind]
        tokens.extend(words)
        tags.extend(["O"] * len(words) if kind == "PLAIN" else [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1))
    return tokens, tags


def main(seed=7, sizes=(("train", 3000), ("validation", 500), ("test", 500))):
    rng = random.Random(seed)
    folder = Path(__file__).parent / "ner"
    folder.mkdir(exist_ok=True)
    seen = set()
    for split, size in sizes:
        with open(folder / f"{split}.json", "w") as file:
            written = 0
            while written < size:
                tokens, tags = sentence(rng)
                if " ".join(tokens) in seen:
                    continue
                seen.add(" ".join(tokens))
                file.write(json.dumps({"id": written, "tokens": tokens, "ner_tags": tags}) + "\n")
                written += 1


if __name__ == "__main__":
    main()
