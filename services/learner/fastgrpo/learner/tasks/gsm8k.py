"""Loader for GSM8K-format JSONL: one {"question": ..., "answer": "... #### 42"} object per line."""
from __future__ import annotations

import json
from pathlib import Path

from fastgrpo.learner.tasks.problem import Problem
from fastgrpo.learner.tasks.rewards import extract_final_answer


def parse_gsm8k_record(record: object, where: str) -> Problem:
    """One decoded JSON record as a Problem; `where` names the record in error messages."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string")
    solution = record["answer"].strip()
    answer = extract_final_answer(solution)
    if answer is None:
        raise ValueError(f"{where}: 'answer' has no final '#### <number>'")
    return Problem(question=record["question"].strip(), solution=solution, answer=answer)


def load_gsm8k_jsonl(path: str | Path) -> list[Problem]:
    """All problems of a GSM8K-format JSONL file; blank lines are skipped.

    Raises ValueError naming the file and 1-based line number of the first malformed line.
    """
    path = Path(path)
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            problems.append(parse_gsm8k_record(record, where))
    return problems
