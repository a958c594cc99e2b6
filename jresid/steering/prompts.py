"""The built-in prompt set that `jresid steer` derives directions from when given no file.

Prompts of the three kinds the shipped model was trained on (recall,
reasoning, refinement), in the format of `models/corpus.py`, drawn from
fixed templates and word lists with a seeded `random.Random`, so the set is
the same on every run. The mode labels come from the metrics, not from the
prompt kind: every kind contributes tokens to every mode, and the mix only
makes it likely that each mode has tokens at every layer.
"""

from __future__ import annotations

import random

_NAMES = ("Alice", "Ana", "Ben", "Bob", "Cal", "Dan", "Emma", "Eve", "Finn", "Grace", "Hugo", "Iris", "Jack",
          "Kate", "Leo", "Mia", "Omar", "Sam", "Tom", "Zoe")
_CITIES = ("Oslo", "Lima", "Rome", "Paris", "Tokyo", "Cairo", "Berlin", "Madrid", "Dublin", "Vienna")
_FOODS = ("apples", "bread", "rice", "soup", "cheese", "fish", "pears", "cake", "tea", "honey")
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
_THINGS = ("box", "ball", "car", "hat", "door", "cup", "kite", "lamp")
_COUNTED = ("apples", "pears", "books", "coins", "cards", "stones", "shells", "stamps")
_SURNAMES = ("Reed", "Moss", "Fox", "Wood", "Lane", "Park", "Cole", "Ward")
_LIST_WORDS = ("sun", "moon", "tree", "rain", "stone", "bell", "lamp", "fish", "corn", "kite", "ship", "road",
               "milk", "leaf", "star", "sand")
_ADJECTIVES = {"big": "large", "small": "little", "happy": "glad", "quick": "fast", "old": "aged", "tired": "sleepy"}
_NOUNS = {"dog": "hound", "cat": "kitten", "child": "kid", "man": "gentleman", "horse": "pony", "bird": "sparrow"}
_VERB_PHRASES = {"runs to the park": "jogs to the park", "sleeps on the mat": "naps on the rug",
                 "sits by the door": "rests near the door"}


def _recall(rng: random.Random) -> str:
    names = rng.sample(_NAMES, rng.randint(2, 4))
    kind = rng.choice(("city", "food", "color", "surname"))
    if kind == "city":
        values = rng.sample(_CITIES, len(names))
        facts = " ".join(f"{name} lives in {city}." for name, city in zip(names, values))
        asked = rng.randrange(len(names))
        return f"{facts} Where does {names[asked]} live? {values[asked]}."
    if kind == "food":
        values = rng.sample(_FOODS, len(names))
        facts = " ".join(f"{name} likes {food}." for name, food in zip(names, values))
        asked = rng.randrange(len(names))
        return f"{facts} What does {names[asked]} like? {values[asked].capitalize()}."
    if kind == "color":
        things = rng.sample(_THINGS, len(names))
        values = rng.sample(_COLORS, len(names))
        facts = " ".join(f"The {thing} is {color}." for thing, color in zip(things, values))
        asked = rng.randrange(len(names))
        return f"{facts} What color is the {things[asked]}? {values[asked].capitalize()}."
    surnames = rng.sample(_SURNAMES, len(names))
    facts = " ".join(f"{name} {surname} came in." for name, surname in zip(names, surnames))
    asked = rng.randrange(len(names))
    return f"{facts} Who waved? {names[asked]} {surnames[asked]}."


def _reasoning(rng: random.Random) -> str:
    kind = rng.choice(("add", "chain", "gain", "compare"))
    if kind == "add":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"{a} + {b} = {a + b}."
    if kind == "chain":
        a, b, c = rng.randint(1, 10), rng.randint(1, 10), rng.randint(2, 3)
        return f"{a} + {b} = {a + b}. {a + b} * {c} = {(a + b) * c}."
    if kind == "gain":
        name, other = rng.sample(_NAMES, 2)
        thing = rng.choice(_COUNTED)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{name} has {a} {thing}. {other} gives them {b} more. Now {name} has {a + b} {thing}."
    first, second, third = rng.sample(_NAMES, 3)
    word = rng.choice(("taller", "older", "faster"))
    return f"{first} is {word} than {second}. {second} is {word} than {third}. So {first} is {word} than {third}."


def _refinement(rng: random.Random) -> str:
    kind = rng.choice(("list", "repeat", "paraphrase"))
    if kind == "list":
        words = " ".join(rng.sample(_LIST_WORDS, rng.randint(3, 7)))
        return f"List: {words}. Again: {words}."
    adjective = rng.choice(sorted(_ADJECTIVES))
    noun = rng.choice(sorted(_NOUNS))
    verb = rng.choice(sorted(_VERB_PHRASES))
    sentence = f"The {adjective} {noun} {verb}."
    if kind == "repeat":
        return f"{sentence} {sentence}"
    return f"{sentence} In other words, the {_ADJECTIVES[adjective]} {_NOUNS[noun]} {_VERB_PHRASES[verb]}."


def builtin_prompts(per_kind: int = 32, seed: int = 0) -> list[str]:
    """Return `3 * per_kind` prompts: recall, reasoning and refinement interleaved.

    Args:
        per_kind: prompts of each kind.
        seed: seed of the template and word draws.
    """
    if per_kind < 1:
        raise ValueError(f"per_kind={per_kind!r} is invalid; use an integer >= 1")
    rng = random.Random(f"jresid-steering-{seed}")
    prompts = []
    for _ in range(per_kind):
        prompts.extend((_recall(rng), _reasoning(rng), _refinement(rng)))
    return prompts
