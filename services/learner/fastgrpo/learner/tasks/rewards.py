"""Verifiable rewards: parse the final "#### N" answer of a completion and score it."""
from __future__ import annotations

import re
from dataclasses import dataclass

from fastgrpo.learner.tasks.problem import Problem

ANSWER_MARKER = "####"
# A number right after the marker: optional sign, digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"\s*([-+]?\d[\d,]*(?:\.\d+)?)")
# Well-formed ending: exactly "#### <integer>" closes the completion (trailing whitespace allowed).
_WELL_FORMED_END = re.compile(r"####[ \t]*-?\d+\s*\Z")


def canonical_number(text: str) -> str:
    """Canonical form of a numeric string: no spaces, commas or "+", no trailing ".0"/".00"."""
    text = text.strip().replace(",", "").lstrip("+")
    whole, dot, frac = text.partition(".")
    if dot and set(frac) <= {"0"}:
        text = whole
    return "0" if text == "-0" else text


def extract_final_answer(text: str) -> str | None:
    """The canonical number after the last "####" in `text`, or None if there is none."""
    pos = text.rfind(ANSWER_MARKER)
    if pos < 0:
        return None
    match = _NUMBER.match(text, pos + len(ANSWER_MARKER))
    if match is None:
        return None
    return canonical_number(match.group(1))


def correctness_reward(completion_text: str, problem: Problem) -> float:
    """1.0 if the completion's final answer equals the problem's answer, else 0.0."""
    return 1.0 if extract_final_answer(completion_text) == problem.answer else 0.0


def format_reward(completion_text: str) -> float:
    """1.0 if the completion has exactly one "####" and ends with "#### <integer>", else 0.0.

    Requiring the marker at the very end also rewards stopping (emitting EOS) after the answer,
    which keeps rollouts short.
    """
    if completion_text.count(ANSWER_MARKER) != 1:
        return 0.0
    return 1.0 if _WELL_FORMED_END.search(completion_text) else 0.0


@dataclass(frozen=True)
class RewardFn:
    """Weighted sum of the correctness and format rewards of one completion."""

    correctness_weight: float = 1.0
    format_weight: float = 0.1

    def __call__(self, completion_text: str, problem: Problem) -> float:
        return self.correctness_weight * correctness_reward(
            completion_text, problem
        ) + self.format_weight * format_reward(completion_text)

    def batch(self, completions: list[str], problems: list[Problem]) -> list[float]:
        """Rewards of completions[i] against problems[i]."""
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
        return [self(c, p) for c, p in zip(completions, problems)]
