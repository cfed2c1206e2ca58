"""Built-in synthetic math task: templated GSM8K-style word problems with integer answers.

Each template draws a person, an item and small operands from a seeded RNG and writes the question
and a short worked solution whose every step is "a op b = c", ending with "#### N". One-step
templates (+, -, *, exact /) and two-step templates mix easy and hard problems so that a small LM
trained for a few CPU minutes lands at a middling accuracy, leaving GRPO room to improve it.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from fastgrpo.learner.tasks.problem import Problem, TaskData

# Operand ranges (inclusive). They set the difficulty: sums and differences of numbers up to a few
# dozen, products of a one-digit count and a small group size. Measured on the default fixture:
# with sums up to 50+50 a 4-layer model learned almost no addition in its budget.
ADD_MAX = 20
COUNT_MIN, COUNT_MAX = 2, 9
GROUP_MIN, GROUP_MAX = 2, 10
EXTRA_MAX = 20

# (name, subject pronoun)
PEOPLE = [
    ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"), ("Omar", "He"), ("Zoe", "She"),
    ("Ben", "He"), ("Ava", "She"), ("Leo", "He"), ("Emma", "She"), ("Raj", "He"), ("Nina", "She"),
    ("Jack", "He"), ("Sara", "She"), ("Ivan", "He"), ("Lucy", "She"), ("Carlos", "He"),
    ("Grace", "She"), ("Ken", "He"), ("Hana", "She"),
]
# Countable things people own, buy, sell and share.
ITEMS = [
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "shells", "stamps",
    "candies", "balloons", "coins", "toys", "eggs", "flowers", "oranges", "buttons", "pens",
]
# Containers that hold equal groups of items.
CONTAINERS = ["boxes", "bags", "baskets", "jars", "packs", "trays"]
FRIENDS_WORD = ["friends", "classmates", "cousins", "neighbors"]

Template = Callable[[random.Random], Problem]


def _problem(question: str, steps: list[str], answer: int) -> Problem:
    """Join solution sentences and append the final-answer line."""
    return Problem(question=question, solution=f"{' '.join(steps)} #### {answer}", answer=str(answer))


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(PEOPLE)


def add_more(rng: random.Random) -> Problem:
    """Owns a, gets b more: a + b."""
    (name, he), item = _person(rng), rng.choice(ITEMS)
    a, b = rng.randint(2, ADD_MAX), rng.randint(2, ADD_MAX)
    verb = rng.choice(["buys", "finds", "gets"])
    q = f"{name} has {a} {item}. {he} {verb} {b} more {item}. How many {item} does {name} have now?"
    return _problem(q, [f"{name} has {a} + {b} = {a + b} {item}."], a + b)


def give_away(rng: random.Random) -> Problem:
    """Owns a, gives or sells b < a: a - b."""
    (name, he), item = _person(rng), rng.choice(ITEMS)
    a = rng.randint(5, 2 * ADD_MAX)
    b = rng.randint(1, a - 1)
    friend = rng.choice([p for p, _ in PEOPLE if p != name])
    verb = rng.choice([f"gives {b} of them to {friend}", f"sells {b} of them", f"loses {b} of them"])
    q = f"{name} has {a} {item}. {he} {verb}. How many {item} does {name} have left?"
    return _problem(q, [f"{name} has {a} - {b} = {a - b} {item} left."], a - b)


def equal_groups(rng: random.Random) -> Problem:
    """n containers of k items: n * k."""
    (name, _), item, box = _person(rng), rng.choice(ITEMS), rng.choice(CONTAINERS)
    n, k = rng.randint(COUNT_MIN, COUNT_MAX), rng.randint(GROUP_MIN, GROUP_MAX)
    q = f"{name} has {n} {box} with {k} {item} in each. How many {item} does {name} have in total?"
    return _problem(q, [f"{name} has {n} * {k} = {n * k} {item}."], n * k)


def share_equally(rng: random.Random) -> Problem:
    """Shares n * k items among n people: (n * k) / n, always exact."""
    (name, _), item, friends = _person(rng), rng.choice(ITEMS), rng.choice(FRIENDS_WORD)
    n, k = rng.randint(COUNT_MIN, COUNT_MAX), rng.randint(GROUP_MIN, GROUP_MAX)
    total = n * k
    q = (
        f"{name} shares {total} {item} equally among {n} {friends}. "
        f"How many {item} does each of them get?"
    )
    return _problem(q, [f"Each gets {total} / {n} = {k} {item}."], k)


def buy_then_sell(rng: random.Random) -> Problem:
    """Owns a, buys b, sells c <= a + b: (a + b) - c."""
    (name, he), item = _person(rng), rng.choice(ITEMS)
    a, b = rng.randint(2, ADD_MAX), rng.randint(2, ADD_MAX)
    c = rng.randint(1, a + b - 1)
    q = (
        f"{name} has {a} {item}. {he} buys {b} more and then sells {c}. "
        f"How many {item} does {name} have now?"
    )
    steps = [f"{name} has {a} + {b} = {a + b} {item}.", f"Then {a + b} - {c} = {a + b - c}."]
    return _problem(q, steps, a + b - c)


def groups_plus_extra(rng: random.Random) -> Problem:
    """n containers of k items plus e loose ones: n * k + e."""
    (name, _), item, box = _person(rng), rng.choice(ITEMS), rng.choice(CONTAINERS)
    n, k, e = rng.randint(COUNT_MIN, COUNT_MAX), rng.randint(GROUP_MIN, GROUP_MAX), rng.randint(1, EXTRA_MAX)
    q = (
        f"{name} has {n} {box} of {k} {item} and {e} more {item} on the table. "
        f"How many {item} does {name} have?"
    )
    steps = [f"The {box} hold {n} * {k} = {n * k} {item}.", f"Then {n * k} + {e} = {n * k + e}."]
    return _problem(q, steps, n * k + e)


def change_from_payment(rng: random.Random) -> Problem:
    """Buys n items at p dollars each, pays with a round bill: bill - n * p."""
    (name, he), item = _person(rng), rng.choice(ITEMS)
    n, p = rng.randint(COUNT_MIN, COUNT_MAX), rng.randint(GROUP_MIN, GROUP_MAX)
    cost = n * p
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    q = (
        f"{name} buys {n} {item} that cost {p} dollars each. {he} pays with {bill} dollars. "
        f"How many dollars of change does {name} get?"
    )
    steps = [f"The {item} cost {n} * {p} = {cost} dollars.", f"The change is {bill} - {cost} = {bill - cost}."]
    return _problem(q, steps, bill - cost)


TEMPLATES: list[Template] = [
    add_more, give_away, equal_groups, share_equally, buy_then_sell, groups_plus_extra, change_from_payment,
]


def _draw_unique(rng: random.Random, n: int, taken: set[str]) -> list[Problem]:
    """n problems whose questions are new to `taken` (which is updated), templates drawn uniformly."""
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems; the template space is too small")
        problem = rng.choice(TEMPLATES)(rng)
        if problem.question not in taken:
            taken.add(problem.question)
            problems.append(problem)
    return problems


def synthetic_math(seed: int = 0, n_train: int = 5000, n_test: int = 500) -> TaskData:
    """A seeded train/test split of synthetic word problems with disjoint questions.

    The test split is drawn first from its own RNG stream, so it depends only on (seed, n_test):
    a fixture trained with a larger n_train is evaluated on the same test problems as the learner.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be non-negative")
    taken: set[str] = set()
    test = _draw_unique(random.Random(f"synthetic-math-test-{seed}"), n_test, taken)
    train = _draw_unique(random.Random(f"synthetic-math-train-{seed}"), n_train, taken)
    return TaskData(train=train, test=test)
