"""Learner tasks: the built-in synthetic math task, a GSM8K JSONL loader and verifiable rewards."""
from fastgrpo.learner.tasks.gsm8k import load_gsm8k_jsonl, parse_gsm8k_record
from fastgrpo.learner.tasks.problem import (
    PROMPT_TEMPLATE,
    Problem,
    TaskData,
    format_completion,
    format_prompt,
)
from fastgrpo.learner.tasks.rewards import (
    RewardFn,
    canonical_number,
    correctness_reward,
    extract_final_answer,
    format_reward,
)
from fastgrpo.learner.tasks.synthetic import TEMPLATES, synthetic_math

__all__ = [
    "PROMPT_TEMPLATE",
    "Problem",
    "RewardFn",
    "TEMPLATES",
    "TaskData",
    "canonical_number",
    "correctness_reward",
    "extract_final_answer",
    "format_completion",
    "format_prompt",
    "format_reward",
    "load_gsm8k_jsonl",
    "parse_gsm8k_record",
    "synthetic_math",
]
