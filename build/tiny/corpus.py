"""kiln's deterministic text corpus: the tiny model's training text, tokenizer corpus and default calibration set.

Generated from small word tables with a seeded ``random.Random`` (whose sequence is stable across Python
versions), so every machine produces the same bytes without downloading anything. The text has real
structure — facts that stay consistent, arithmetic, short dialogues in the chat format — so a briefly trained
model learns peaked next-token distributions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

ANIMALS = {
    "cat": ("small", "purrs", "fish"),
    "dog": ("loyal", "barks", "bones"),
    "cow": ("large", "moos", "grass"),
    "horse": ("fast", "neighs", "hay"),
    "owl": ("wise", "hoots", "mice"),
    "duck": ("cheerful", "quacks", "bread"),
    "bee": ("busy", "buzzes", "nectar"),
    "lion": ("brave", "roars", "meat"),
    "frog": ("green", "croaks", "flies"),
    "sheep": ("gentle", "bleats", "clover"),
    "mouse": ("tiny", "squeaks", "cheese"),
    "wolf": ("wild", "howls", "deer"),
}
COLORS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "sun": "yellow",
    "blood": "red",
    "orange": "orange",
    "plum": "purple",
    "sand": "beige",
    "night": "dark",
    "cloud": "grey",
    "rose": "red",
}
PLACES = [
    "the garden",
    "the river",
    "the forest",
    "the market",
    "the old mill",
    "the hill",
    "the village",
    "the library",
    "the harbor",
    "the meadow",
    "the kitchen",
    "the station",
]
NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lea", "Milo", "Nia"]
VERBS = ["walked to", "ran to", "looked at", "painted", "visited", "cleaned", "sang near", "read about"]
TIMES = ["In the morning", "At noon", "In the evening", "At night", "On Monday", "Last spring", "Every day"]
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
]
GREETINGS = ["Hello", "Hi", "Good morning", "Hey there", "Greetings"]


def _animal_fact(r: random.Random) -> str:
    animal = r.choice(sorted(ANIMALS))
    adj, sound, food = ANIMALS[animal]
    return r.choice(
        [
            f"The {animal} is {adj}.",
            f"A {animal} {sound}.",
            f"The {animal} likes to eat {food}.",
            f"Every {animal} {sound} when it is hungry for {food}.",
        ]
    )


def _color_fact(r: random.Random) -> str:
    thing = r.choice(sorted(COLORS))
    return r.choice([f"The {thing} is {COLORS[thing]}.", f"The color of the {thing} is {COLORS[thing]}."])


def _arith(r: random.Random) -> str:
    a, b = r.randrange(10), r.randrange(9)
    return f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."


def _story(r: random.Random) -> str:
    name, other = r.sample(NAMES, 2)
    return (
        f"{r.choice(TIMES)}, {name} {r.choice(VERBS)} {r.choice(PLACES)}. "
        f"{other} went with {name}, and they saw a {r.choice(sorted(ANIMALS))}."
    )


def _qa(r: random.Random) -> tuple[str, str]:
    kind = r.randrange(4)
    if kind == 0:
        thing = r.choice(sorted(COLORS))
        return f"What color is the {thing}?", f"The {thing} is {COLORS[thing]}."
    if kind == 1:
        animal = r.choice(sorted(ANIMALS))
        return f"What does the {animal} eat?", f"The {animal} likes to eat {ANIMALS[animal][2]}."
    if kind == 2:
        a, b = r.randrange(10), r.randrange(9)
        return (
            f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
            f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.",
        )
    greeting = r.choice(GREETINGS)
    return f"{greeting}!", f"{greeting}! I am a tiny model made by kiln. Ask me about animals, colors or sums."


def chat_text(user: str, assistant: str) -> str:
    """A dialogue in the tiny tokenizer's chat format (the chat template renders the same string)."""
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"


def documents(n: int, seed: int = 0, split: str = "train") -> Iterator[str]:
    """``n`` short documents. ``split="heldout"`` draws from a disjoint seed stream for evaluation."""
    r = random.Random(f"kiln-corpus/{split}/{seed}")
    makers = (_animal_fact, _color_fact, _arith, _story)
    for _ in range(n):
        if r.random() < 0.3:
            yield chat_text(*_qa(r))
        else:
            yield " ".join(r.choice(makers)(r) for _ in range(r.randint(2, 5)))
