"""benchmarks/device/gpu.py --cpu-smoke: the one-call GPU benchmark script, end to end on the CPU
with the default fixture (what the device run does, at tiny sizes, so a device call is not where
a typo shows up)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "gpu.py"


def test_cpu_smoke_writes_every_suite_naming_the_card(fixture_dir, draft_dir, tmp_path):
    # the script finds the fixture and its draft where the suite's fixtures are cached
    env = dict(os.environ, OUT=str(tmp_path), FASTGRPO_CACHE=str(fixture_dir.parent))
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True, timeout=240,
                         env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    docs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(docs) == {f"{s}-cpu.json" for s in ("plain", "knee", "spec", "concurrency", "run")}, sorted(docs)
    cpu = docs["plain-cpu.json"]["machine"]["cpu"]
    assert cpu and all(doc["card"] == cpu for doc in docs.values())

    plain = docs["plain-cpu.json"]["records"]
    settings = {r["compile"] for r in plain}
    rates = {(r["model"], r["batch_size"], r["compile"]): r["tokens_per_s"] for r in plain}
    assert set(rates) == {(m, B, c) for m in ("fixture", "llama") for B in (1, 8) for c in settings}
    assert all(tps > 0 for tps in rates.values()), rates
    assert all(0 < r["tokens_per_s_bandwidth_bound"] < math.inf for r in plain)

    knee = {r["model"]: r["c_peak"] for r in docs["knee-cpu.json"]["records"]}
    assert set(knee) == {"fixture", "llama"} and all(math.isfinite(c) and c > 0 for c in knee.values()), knee

    spec = docs["spec-cpu.json"]["records"]
    assert [r["batch_size"] for r in spec] == [1, 8]
    assert all(r["tokens_per_s_plain"] > 0 and r["tokens_per_s_spec"] > 0 for r in spec)
    conc = docs["concurrency-cpu.json"]
    assert conc["c_peak"] == knee["fixture"]  # the knee section's C_peak, not a second profile
    assert {(r["workload"], r["mode"]) for r in conc["records"]} == {
        (w, m) for w in ("fixed", "grpo-tail") for m in ("off", "static", "adaptive")}
    assert all(r["tokens_per_s"] > 0 for r in conc["records"])

    assert [r["status"] for r in docs["run-cpu.json"]["records"]] == ["ok"] * 6
    log = (tmp_path / "log.txt").read_text()
    assert "=== summary" in log and "--- plain-cpu.json" in log
