"""Generates the shipped parallel corpus: English to "Toy", a rule-based language, in the jsonlines layout of
Hugging Face translation data sets ({"translation": {"en": ..., "toy": ...}}).

Toy is not English with other words: the verb goes last (subject, object, verb), adjectives follow their noun and
agree with it in number, articles and verbs agree with number, the past tense and negation are marked on the verb,
prepositions become postpositions, time words move to the front, and some words are irregular (child/children,
mouse/mice, man/men in English; "go" and "eat" in Toy). Copying the source scores no BLEU. Deterministic; rerun to
regenerate the files."""

import json
import random
from pathlib import Path


# English singular, English plural, Toy singular, Toy plural.
NOUNS = [
    ("dog", "dogs", "hundo", "hundoj"),
    ("cat", "cats", "kato", "katoj"),
    ("bird", "birds", "pajo", "pajoj"),
    ("child", "children", "nino", "ninaro"),
    ("mouse", "mice", "muso", "musen"),
    ("man", "men", "viro", "viroj"),
    ("woman", "women", "vina", "vinaj"),
    ("teacher", "teachers", "dosto", "dostoj"),
    ("farmer", "farmers", "kampo", "kampoj"),
    ("horse", "horses", "ceva", "cevaj"),
]
PLACES = [("garden", "gardeno"), ("house", "domo"), ("river", "riveru"), ("city", "urbo"), ("forest", "arbaro")]
# English adjective, Toy singular, Toy plural.
ADJECTIVES = [
    ("big", "granda", "grandaj"),
    ("small", "eta", "etaj"),
    ("old", "malnova", "malnovaj"),
    ("happy", "feliza", "felizaj"),
    ("black", "nigra", "nigraj"),
    ("red", "ruga", "rugaj"),
]
# English (3rd singular, plural, past, base), Toy (present singular, present plural, past).
VERBS = [
    (("sees", "see", "saw", "see"), ("vidas", "vidan", "vidis")),
    (("eats", "eat", "ate", "eat"), ("manga", "mangan", "mangis")),
    (("chases", "chase", "chased", "chase"), ("casas", "casan", "casis")),
    (("likes", "like", "liked", "like"), ("amas", "aman", "amis")),
    (("follows", "follow", "followed", "follow"), ("sekvas", "sekvan", "sekvis")),
    (("finds", "find", "found", "find"), ("trovas", "trovan", "trovis")),
]
# Verbs without an object, with a place: "goes to", Toy irregular "iri".
MOTION = [
    (("goes", "go", "went", "go"), ("va", "van", "iris")),
    (("runs", "run", "ran", "run"), ("kuras", "kuran", "kuris")),
]
TIMES = [("yesterday", "hieru"), ("today", "hodiu"), ("often", "ofte")]


def noun_phrase(rng):
    """English and Toy for `the/a [adjective] noun(s)`, and whether it is plural."""
    english_singular, english_plural, toy_singular, toy_plural = rng.choice(NOUNS)
    plural = rng.random() < 0.4
    definite = plural or rng.random() < 0.6
    english = ["the" if definite else "a"]
    toy = ["la" if not plural else "lai"] if definite else ["un"]
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.5 else None
    if adjective:
        english.append(adjective[0])
    english.append(english_plural if plural else english_singular)
    toy.append(toy_plural if plural else toy_singular)
    if adjective:
        toy.append(adjective[2] if plural else adjective[1])
    return english, toy, plural


def verb_forms(verb, plural, past, negated):
    (english_3rd, english_plural, english_past, english_base), (toy_singular, toy_plural, toy_past) = verb
    if negated:
        auxiliary = "did" if past else ("do" if plural else "does")
        return [auxiliary, "not", english_base], ["ne", toy_past if past else (toy_plural if plural else toy_singular)]
    english = english_past if past else (english_plural if plural else english_3rd)
    return [english], [toy_past if past else (toy_plural if plural else toy_singular)]


def sentence_pair(rng):
    time = rng.choice(TIMES) if rng.random() < 0.35 else None
    past = time[0] == "yesterday" if time else rng.random() < 0.3
    negated = rng.random() < 0.2
    subject_en, subject_toy, plural = noun_phrase(rng)
    if rng.random() < 0.7:  # subject verb object
        verb_en, verb_toy = verb_forms(rng.choice(VERBS), plural, past, negated)
        object_en, object_toy, _ = noun_phrase(rng)
        english, toy = subject_en + verb_en + object_en, subject_toy + object_toy + verb_toy
    else:  # subject goes/runs to the place
        verb_en, verb_toy = verb_forms(rng.choice(MOTION), plural, past, negated)
        place_en, place_toy = rng.choice(PLACES)
        english = subject_en + verb_en + ["to", "the", place_en]
        toy = subject_toy + ["la", place_toy, "al"] + verb_toy
    if time:
        english = english + [time[0]] if rng.random() < 0.5 else [time[0].capitalize()] + english
        toy = [time[1]] + toy
    english[0] = english[0].capitalize()
    return " ".join(english) + " .", " ".join(toy) + " ."


def main():
    rng = random.Random(7)
    pairs, seen = [], set()
    while len(pairs) < 7000:
        english, toy = sentence_pair(rng)
        if english not in seen:  # no sentence in two splits
            seen.add(english)
            pairs.append({"translation": {"en": english, "toy": toy}})
    folder = Path(__file__).parent / "en-toy"
    folder.mkdir(exist_ok=True)
    for split, rows in (("train", pairs[:6000]), ("validation", pairs[6000:6500]), ("test", pairs[6500:])):
        with open(folder / f"{split}.json", "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
