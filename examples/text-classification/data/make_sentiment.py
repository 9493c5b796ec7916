"""Generates the shipped sentiment data set: short reviews whose label depends on negation and on which clause
carries the verdict ("good but boring" is negative, "boring at first, but good" positive), so the same words
appear under both labels and a bag of words cannot solve it. Deterministic; rerun to regenerate the csv files."""

import csv
import random
from pathlib import Path


SUBJECTS = [
    "the movie",
    "the film",
    "the plot",
    "the acting",
    "the soundtrack",
    "the ending",
    "the story",
    "the cast",
    "the script",
    "the dialogue",
    "the pacing",
    "the visuals",
    "the characters",
    "this show",
    "the sequel",
    "the first half",
    "the humour",
    "the camera work",
    "the lead actor",
    "the finale",
]
POSITIVE = [
    "good",
    "great",
    "wonderful",
    "brilliant",
    "charming",
    "moving",
    "funny",
    "clever",
    "beautiful",
    "gripping",
    "delightful",
    "superb",
    "fresh",
    "touching",
    "sharp",
    "excellent",
]
NEGATIVE = [
    "bad",
    "boring",
    "dull",
    "awful",
    "terrible",
    "weak",
    "clumsy",
    "tedious",
    "bland",
    "predictable",
    "messy",
    "forgettable",
    "flat",
    "silly",
    "slow",
    "painful",
]
VERBS = ["was", "is", "felt", "seemed"]
INTENSIFIERS = ["", "", "really ", "truly ", "very ", "quite ", "rather "]
# A negation flips the polarity of the adjective that follows it.
NEGATIONS = ["not ", "never ", "hardly ", "far from ", "anything but ", "not at all "]


def clause(rng: random.Random, polarity: int) -> str:
    """A clause with the given polarity (+1/-1), negated half of the time."""
    negated = rng.random() < 0.5
    adjectives = POSITIVE if (polarity > 0) != negated else NEGATIVE
    negation = rng.choice(NEGATIONS) if negated else ""
    intensifier = "" if negation.endswith("at all ") else rng.choice(INTENSIFIERS)
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {negation}{intensifier}{rng.choice(adjectives)}"


def review(rng: random.Random) -> tuple[str, int]:
    label = rng.choice([1, -1])
    verdict, other = clause(rng, label), clause(rng, -label)
    template = rng.randrange(6)
    if template == 0:
        text = verdict
    elif template == 1:
        text = f"{other}, but {verdict}"
    elif template == 2:
        text = f"although {other}, {verdict}"
    elif template == 3:
        text = f"{verdict}, even though {other}"
    elif template == 4:
        text = f"{verdict} and {clause(rng, label)}"
    else:
        adjective = rng.choice(POSITIVE if label < 0 else NEGATIVE)
        text = f"i expected it to be {adjective}, but {verdict}"
    return text, int(label > 0)


def main(seed: int = 13, sizes=(("train", 4000), ("validation", 600), ("test", 600))):
    rng = random.Random(seed)
    seen = set()
    folder = Path(__file__).parent / "sentiment"
    folder.mkdir(exist_ok=True)
    for split, size in sizes:
        rows = []
        while len(rows) < size:
            text, label = review(rng)
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
        with open(folder / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["sentence", "label"])
            writer.writerows(rows)


if __name__ == "__main__":
    main()
