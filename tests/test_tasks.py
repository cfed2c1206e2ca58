"""Pure-function tests of the learner's tasks: synthetic math, GSM8K loader, rewards."""
from __future__ import annotations

import json
import re

import pytest

from fastgrpo.learner.tasks import (
    Problem,
    RewardFn,
    TEMPLATES,
    canonical_number,
    correctness_reward,
    extract_final_answer,
    format_completion,
    format_prompt,
    format_reward,
    load_gsm8k_jsonl,
    synthetic_math,
)

pytestmark = pytest.mark.unit

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.fixture(scope="module")
def data():
    return synthetic_math(seed=0, n_train=2000, n_test=300)


def test_sizes_and_determinism(data):
    assert len(data.train) == 2000 and len(data.test) == 300
    again = synthetic_math(seed=0, n_train=2000, n_test=300)
    assert again.train == data.train and again.test == data.test
    other = synthetic_math(seed=1, n_train=2000, n_test=300)
    assert other.train != data.train and other.test != data.test


def test_train_and_test_are_disjoint_and_unique(data):
    train_q = [p.question for p in data.train]
    test_q = [p.question for p in data.test]
    assert len(set(train_q)) == len(train_q) and len(set(test_q)) == len(test_q)
    assert not set(train_q) & set(test_q)


def test_test_split_does_not_depend_on_train_size(data):
    bigger = synthetic_math(seed=0, n_train=3000, n_test=300)
    assert bigger.test == data.test
    assert bigger.train[:2000] == data.train


def test_every_solution_is_arithmetically_right(data):
    for p in data.train + data.test:
        assert extract_final_answer(p.solution) == p.answer
        assert p.solution.endswith(f"#### {p.answer}")
        assert int(p.answer) >= 0
        steps = STEP.findall(p.solution)
        assert 1 <= len(steps) <= 2, p.solution
        for a, op, b, c in steps:
            assert OPS[op](int(a), int(b)) == int(c), p.solution
        # The last step's result is the final answer.
        assert steps[-1][3] == p.answer
        # Every operand that is not an intermediate result is stated in the question.
        for a, _, b, _ in steps:
            for operand in (a, b):
                assert re.search(rf"\b{operand}\b", p.question) or operand == steps[0][3], p


def test_templates_cover_all_operations_and_step_counts(data):
    steps = [STEP.findall(p.solution) for p in data.train]
    assert {op for s in steps for _, op, _, _ in s} == set("+-*/")
    assert {len(s) for s in steps} == {1, 2}
    assert len(TEMPLATES) >= 6


def test_prompt_and_completion_format():
    p = Problem(question="Tom has 3 apples. How many?", solution="3 + 0 = 3. #### 3", answer="3")
    assert format_prompt(p.question) == "Question: Tom has 3 apples. How many?\nAnswer:"
    assert format_completion(p) == " 3 + 0 = 3. #### 3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3 + 5 = 8. #### 8", "8"),
        ("#### 1,234", "1234"),
        ("#### +7", "7"),
        ("#### 12.0", "12"),
        ("#### 12.50", "12.50"),
        ("#### -3 apples", "-3"),
        ("####42", "42"),
        ("#### 5 then #### 6", "6"),
        ("#### 6.", "6"),
        ("no marker 8", None),
        ("#### eight", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_canonical_number():
    assert canonical_number(" 1,000.00 ") == "1000"
    assert canonical_number("-0") == "0"
    assert canonical_number("+15") == "15"


def test_correctness_reward():
    p = Problem(question="q", solution="2 + 2 = 4. #### 4", answer="4")
    assert correctness_reward(" 2 + 2 = 4. #### 4", p) == 1.0
    assert correctness_reward(" 2 + 2 = 4. #### 4.0", p) == 1.0
    assert correctness_reward(" 2 + 2 = 5. #### 5", p) == 0.0
    assert correctness_reward(" 2 + 2 = 4.", p) == 0.0
    assert correctness_reward("#### 44", p) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 2 + 2 = 4. #### 4", 1.0),
        (" 2 + 2 = 4.\n#### 4\n", 1.0),
        (" #### -4", 1.0),
        (" 2 + 2 = 4.", 0.0),
        (" #### 4 and more text", 0.0),
        (" #### 4. #### 4", 0.0),
        (" #### four", 0.0),
        (" #### 4.5", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_reward_fn_weights():
    p = Problem(question="q", solution="#### 4", answer="4")
    fn = RewardFn(correctness_weight=1.0, format_weight=0.25)
    assert fn(" #### 4", p) == 1.25
    assert fn(" #### 4 ok", p) == 1.0
    assert fn(" #### 5", p) == 0.25
    assert fn(" nothing", p) == 0.0
    assert fn.batch([" #### 4", " #### 5"], [p, p]) == [1.25, 0.25]
    with pytest.raises(ValueError):
        fn.batch([" #### 4"], [p, p])


def test_load_gsm8k_jsonl(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "Natalia sold 48 clips. ", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 1,024"},
        {"question": "How many?", "answer": "#### 7"},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    problems = load_gsm8k_jsonl(path)
    assert problems == [
        Problem(question="Natalia sold 48 clips.", solution=rows[0]["answer"], answer="1024"),
        Problem(question="How many?", solution="#### 7", answer="7"),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"question": "q"}', "missing key 'answer'"),
        ('{"question": 3, "answer": "#### 3"}', "'question' must be a string"),
        ('{"question": "q", "answer": "no final answer"}', "no final"),
    ],
)
def test_load_gsm8k_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path.write_text(f"{good}\n{good}\n{bad_line}\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{re.escape(message)}"):
        load_gsm8k_jsonl(path)


def test_train_size_keeps_the_first_problems_and_refuses_a_negative_size():
    from fastgrpo.learner.config import LearnerConfig
    from fastgrpo.learner.loop import load_task

    full, test = load_task(LearnerConfig(model="m"))
    small, small_test = load_task(LearnerConfig(model="m", train_size=5))
    assert small == full[:5] and small_test == test and len(full) > 5
    with pytest.raises(ValueError, match="--train-size must be >= 0"):
        load_task(LearnerConfig(model="m", train_size=-1))
