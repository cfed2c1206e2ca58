"""The unit of a task: one word problem with a worked solution and its final answer."""
from __future__ import annotations

from dataclasses import dataclass

# The one prompt template shared by the fixture builder (SFT) and the learner (RL): a policy
# trained on one template and sampled with another would start RL from a broken distribution.
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Problem:
    """A question, its worked solution ending in "#### N", and N as a canonical string."""

    question: str
    solution: str
    answer: str


@dataclass(frozen=True)
class TaskData:
    """A train/test split; the two lists share no question."""

    train: list[Problem]
    test: list[Problem]


def format_prompt(question: str) -> str:
    """The prompt the policy continues with " {solution}" and then EOS."""
    return PROMPT_TEMPLATE.format(question=question)


def format_completion(problem: Problem) -> str:
    """The supervised target text that follows `format_prompt(problem.question)` (EOS not included)."""
    return " " + problem.solution
