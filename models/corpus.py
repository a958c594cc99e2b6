"""Synthetic English-like corpus for training the default jresid model.

Every document is a few short episodes of three kinds, one for each mode that
jresid labels:

* recall: facts stated earlier in the text and then looked up
  ("Ana lives in Oslo. Ben lives in Lima. Where does Ben live? Lima."), or
  a surname completed from a first name stated earlier ("Ana Reed came in.
  Ben Moss came in. Who laughed? Ben Moss.").
* reasoning: arithmetic, chained arithmetic, word problems and chained
  comparisons ("7 + 5 = 12. 12 * 2 = 24.").
* refinement: a sentence repeated, restated with synonyms, or a word list
  copied ("The big dog runs to the park. In other words, the large dog
  jogs to the park.").

Generation uses only `random.Random`, seeded with a string made of the seed
and the split or task name, so one seed always gives the same text. Each task
also yields `(prompt, answer)` pairs for evaluation, in the same format as the
training text, where the answer is everything the model should produce after
the prompt.

This module needs only the Python standard library.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

END_OF_TEXT = "<|endoftext|>"

FEMALE_NAMES = ("Alice", "Ana", "Carol", "Emma", "Eve", "Gina", "Grace", "Iris", "Judy", "Kate", "Mia", "Olga",
                "Rosa", "Sara", "Uma", "Vera", "Zoe", "Lily")
MALE_NAMES = ("Bob", "Ben", "Cal", "Dan", "Dave", "Finn", "Frank", "Hugo", "Ivan", "Jack", "Leo", "Max", "Nick",
              "Paul", "Sam", "Tom", "Omar", "Carl")
NAMES = FEMALE_NAMES + MALE_NAMES
CITIES = ("Oslo", "Lima", "Rome", "Paris", "Tokyo", "Cairo", "Berlin", "Madrid", "Dublin", "Vienna", "Prague",
          "Delhi", "Seoul", "Quito", "Athens", "Lisbon", "Warsaw", "Nairobi", "Sydney", "Boston")
FOODS = ("apples", "bread", "rice", "soup", "cheese", "fish", "pears", "grapes", "cake", "beans", "eggs", "tea",
         "plums", "corn", "honey", "pasta")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "gray", "orange", "purple")
COLORED_THINGS = ("box", "ball", "car", "hat", "door", "cup", "kite", "bike", "lamp", "coat", "bag", "chair")
COUNTED_THINGS = ("apples", "pears", "books", "coins", "cards", "eggs", "pens", "stones", "shells", "cups",
                  "marbles", "stamps")
SURNAMES = ("Reed", "Moss", "Fox", "Wood", "Lane", "Park", "Cole", "Ward", "Hart", "Shaw", "Nash", "Diaz", "Kim",
            "Chen", "Patel", "Novak", "Berg", "Silva")
SURNAME_QUESTIONS = ("Who waved?", "Who sat down?", "Who spoke first?", "Who left early?", "Who laughed?")
COMPARISONS = (("taller", "tallest"), ("older", "oldest"), ("faster", "fastest"), ("stronger", "strongest"))

# Sentence parts for refinement episodes, with the one synonym that a
# paraphrase uses for each ("big" always becomes "large").
ADJECTIVES = {"big": "large", "small": "little", "happy": "glad", "quick": "fast", "old": "aged",
              "quiet": "silent", "bright": "shiny", "tired": "sleepy", "angry": "upset", "kind": "nice"}
NOUNS = {"dog": "hound", "cat": "kitten", "bird": "sparrow", "child": "kid", "man": "gentleman",
         "woman": "lady", "horse": "pony", "boat": "ship", "house": "home", "road": "street"}
VERB_PHRASES = {
    "runs to the park": "jogs to the park",
    "sleeps on the mat": "naps on the rug",
    "sits by the door": "rests near the door",
    "eats the bread": "consumes the bread",
    "looks at the sky": "watches the sky",
    "walks home": "strolls home",
    "sings a song": "hums a tune",
    "reads a book": "studies a book",
    "jumps over the wall": "leaps over the wall",
    "stays in the garden": "remains in the garden",
}
LIST_WORDS = ("sun", "moon", "tree", "river", "stone", "cloud", "fire", "rain", "snow", "leaf", "star", "sand",
              "wind", "hill", "lake", "road", "door", "bell", "milk", "salt", "gold", "iron", "rose", "wolf",
              "ship", "lamp", "coin", "fish", "bird", "rock", "seed", "wave", "town", "king", "ring", "drum")

RECALL_RELATIONS = ("lives", "likes", "color", "age", "surname")
REASONING_KINDS = ("add", "sub", "mul", "chain", "word_gain", "word_loss", "compare")
REFINEMENT_KINDS = ("repeat", "paraphrase", "list")
# Word lists are most of the refinement episodes, and refinement is the
# largest mode, because copying is what a model this small learns last. In
# trial runs, the attention heads that copy from earlier in the context formed
# between steps 2,500 and 3,750, or not within 4,000 steps.
REFINEMENT_WEIGHTS = (0.2, 0.2, 0.6)

# Relative frequency of the three modes in the training text.
MODE_WEIGHTS = {"recall": 0.35, "reasoning": 0.2, "refinement": 0.45}


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation item: the model should continue `prompt` with `answer`.

    `choices` is the number of candidate answers stated in the prompt (the
    facts of a recall passage), so `1 / choices` is the accuracy of guessing
    among them. It is 0 where that chance level does not apply.
    """

    prompt: str
    answer: str
    choices: int = 0


# --------------------------------------------------------------------------
# Recall: facts, then questions about them.
# --------------------------------------------------------------------------


def _recall_facts(rng: random.Random, relation: str, count: int) -> list[tuple[str, str, str, str]]:
    """Return `(fact, question, answer, key)` tuples with distinct keys and distinct answers."""
    if relation == "color":
        things = rng.sample(COLORED_THINGS, count)
        colors = rng.sample(COLORS, count)
        return [(f"The {thing} is {color}.", f"What color is the {thing}?", color, thing)
                for thing, color in zip(things, colors)]
    names = rng.sample(NAMES, count)
    if relation == "surname":
        # The question ends with the first name, so the answer is the word that
        # followed that name earlier, which is the lookup an induction head does.
        surnames = rng.sample(SURNAMES, count)
        return [(f"{name} {surname} came in.", f"{rng.choice(SURNAME_QUESTIONS)} {name}", surname, name)
                for name, surname in zip(names, surnames)]
    if relation == "lives":
        cities = rng.sample(CITIES, count)
        return [(f"{name} lives in {city}.", f"Where does {name} live?", city, name)
                for name, city in zip(names, cities)]
    if relation == "likes":
        foods = rng.sample(FOODS, count)
        return [(f"{name} likes {food}.", f"What does {name} like?", food, name)
                for name, food in zip(names, foods)]
    if relation == "age":
        ages = rng.sample(range(5, 90), count)
        return [(f"{name} is {age} years old.", f"How old is {name}?", str(age), name)
                for name, age in zip(names, ages)]
    raise ValueError(f"unknown recall relation {relation!r}; expected one of {RECALL_RELATIONS}")


def recall_episode(rng: random.Random, relation: str | None = None) -> tuple[str, list[Example]]:
    """Return a passage of 2 to 6 facts followed by answered questions about some of them, and the questions as examples."""
    relation = relation or rng.choice(RECALL_RELATIONS)
    count = rng.randint(2, 6)
    facts = _recall_facts(rng, relation, count)
    text = " ".join(fact for fact, _, _, _ in facts)
    examples = []
    for _, question, answer, _ in rng.sample(facts, rng.randint(1, count)):
        examples.append(Example(f"{text} {question}", f" {answer}.", choices=count))
        text = f"{text} {question} {answer}."
    return text, examples


# --------------------------------------------------------------------------
# Reasoning: arithmetic, word problems and chained comparisons.
# --------------------------------------------------------------------------


def _pronouns(name: str) -> tuple[str, str]:
    """Return the subject and object pronoun for a name ("She", "her")."""
    return ("She", "her") if name in FEMALE_NAMES else ("He", "him")


def reasoning_episode(rng: random.Random, kind: str | None = None) -> tuple[str, Example]:
    """Return one reasoning episode and the example that asks for its last result.

    Every number stays within 0 to 100.
    """
    kind = kind or rng.choice(REASONING_KINDS)
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        prompt, answer = f"{a} + {b} =", f" {a + b}."
    elif kind == "sub":
        a = rng.randint(0, 40)
        b = rng.randint(0, a)
        prompt, answer = f"{a} - {b} =", f" {a - b}."
    elif kind == "mul":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        prompt, answer = f"{a} * {b} =", f" {a * b}."
    elif kind == "chain":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        total = a + b
        if rng.random() < 0.5:
            result = total * 2
            step = f"{total} * 2 ="
        else:
            other = rng.randint(0, total)
            result = total - other
            step = f"{total} - {other} ="
        prompt, answer = f"{a} + {b} = {total}. {step}", f" {result}."
    elif kind == "word_gain":
        owner, giver = rng.sample(NAMES, 2)
        thing = rng.choice(COUNTED_THINGS)
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        _, object_pronoun = _pronouns(owner)
        prompt = f"{owner} has {a} {thing}. {giver} gives {object_pronoun} {b} more. Now {owner} has"
        answer = f" {a + b} {thing}."
    elif kind == "word_loss":
        owner, taker = rng.sample(NAMES, 2)
        thing = rng.choice(COUNTED_THINGS)
        a = rng.randint(2, 20)
        b = rng.randint(1, a)
        subject_pronoun, _ = _pronouns(owner)
        prompt = f"{owner} has {a} {thing}. {subject_pronoun} gives {b} to {taker}. Now {owner} has"
        answer = f" {a - b} {thing}."
    elif kind == "compare":
        comparative, superlative = rng.choice(COMPARISONS)
        people = rng.sample(NAMES, rng.randint(3, 4))
        steps = [f"{first} is {comparative} than {second}." for first, second in zip(people, people[1:])]
        if rng.random() < 0.5:
            prompt = " ".join(steps) + f" So {people[0]} is {comparative} than"
            answer = f" {people[-1]}."
        else:
            prompt = " ".join(steps) + f" Who is the {superlative}?"
            answer = f" {people[0]}."
    else:
        raise ValueError(f"unknown reasoning kind {kind!r}; expected one of {REASONING_KINDS}")
    return prompt + answer, Example(prompt, answer)


# --------------------------------------------------------------------------
# Refinement: repetition, paraphrase and copying.
# --------------------------------------------------------------------------


def _sentence_parts(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(list(ADJECTIVES)), rng.choice(list(NOUNS)), rng.choice(list(VERB_PHRASES))


def refinement_episode(rng: random.Random, kind: str | None = None) -> tuple[str, Example]:
    """Return one refinement episode and the example that asks for the repeated or restated part."""
    kind = kind or rng.choices(REFINEMENT_KINDS, weights=REFINEMENT_WEIGHTS)[0]
    if kind == "repeat":
        adjective, noun, verb = _sentence_parts(rng)
        sentence = f"The {adjective} {noun} {verb}."
        prompt, answer = f"{sentence} Again:", f" {sentence}"
    elif kind == "paraphrase":
        adjective, noun, verb = _sentence_parts(rng)
        sentence = f"The {adjective} {noun} {verb}."
        restated = f"the {ADJECTIVES[adjective]} {NOUNS[noun]} {VERB_PHRASES[verb]}."
        prompt, answer = f"{sentence} In other words,", f" {restated}"
    elif kind == "list":
        words = " ".join(rng.sample(LIST_WORDS, rng.randint(4, 10)))
        prompt, answer = f"List: {words}. Again:", f" {words}."
    else:
        raise ValueError(f"unknown refinement kind {kind!r}; expected one of {REFINEMENT_KINDS}")
    return prompt + answer, Example(prompt, answer)


# --------------------------------------------------------------------------
# Documents and evaluation sets.
# --------------------------------------------------------------------------


def _episode(rng: random.Random) -> str:
    mode = rng.choices(list(MODE_WEIGHTS), weights=list(MODE_WEIGHTS.values()))[0]
    if mode == "recall":
        return recall_episode(rng)[0]
    if mode == "reasoning":
        return reasoning_episode(rng)[0]
    return refinement_episode(rng)[0]


def generate_document(rng: random.Random) -> str:
    """Return one document: 2 to 5 episodes of random modes, one per line."""
    return "\n".join(_episode(rng) for _ in range(rng.randint(2, 5)))


def generate_documents(count: int, seed: int, split: str = "train") -> list[str]:
    """Return `count` documents; the same seed and split always give the same list.

    Different splits ("train", "heldout") draw from independent generators.
    """
    rng = random.Random(f"{split}/{seed}")
    return [generate_document(rng) for _ in range(count)]


# Each task is a function from a random generator to one Example.
TASKS: dict[str, Callable[[random.Random], Example]] = {
    **{f"recall_{relation}": (lambda rng, r=relation: recall_episode(rng, r)[1][0]) for relation in RECALL_RELATIONS},
    **{f"reasoning_{kind}": (lambda rng, k=kind: reasoning_episode(rng, k)[1]) for kind in REASONING_KINDS},
    **{f"refinement_{kind}": (lambda rng, k=kind: refinement_episode(rng, k)[1]) for kind in REFINEMENT_KINDS},
}


def task_examples(task: str, count: int, seed: int) -> list[Example]:
    """Return `count` fresh examples of one task from `TASKS`, seeded independently of the training text."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    rng = random.Random(f"{task}/{seed}")
    return [TASKS[task](rng) for _ in range(count)]
