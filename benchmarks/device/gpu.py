"""The GPU benchmarks in one device call: plain decode and C_peak of the bench fixture and of a
random ~1B Llama, then speculative vs plain and adaptive vs off on the fixture (sections.py).

    python benchmarks/device/gpu.py stash          # a call carrying .gpu/part-0: keeps it in $STASH
    python benchmarks/device/gpu.py stash run      # the call carrying the last piece: everything else
    python benchmarks/device/gpu.py --cpu-smoke    # the same sections on this CPU at tiny sizes

The fixture (pack_fixture.py: bf16 target + draft as .tar.gz pieces) is larger than one call may
carry, so each call stashes its piece on the machine, which stays warm ~30 s between calls. `run`
reassembles and unpacks the pieces into the fixture cache, checks that the fixture and its draft
are there (a cache miss would train them for half an hour), then runs every section in its own
subprocess under its own timeout, so one that fails, hangs or runs out is recorded as such and the
next still runs; the timeouts keep the whole run within the plan's total (7.5 min on a GPU).
Results go to $OUT as <suite>-<card>.json (plain-h200.json, ...) after every measurement, with
run-<card>.json (each section's outcome), log.txt (everything printed) and a summary at the end.

--cpu-smoke runs the same sections on the CPU with the default fixture preset from the local cache
(nothing is unpacked or trained), a tiny random Llama and B = 1, 8: an end-to-end check in about a
minute (tests/test_gpu_script.py).

Environment: OUT (required), STASH (/root/fxparts), FASTGRPO_CACHE (~/.cache/fastgrpo).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOTS = ["proto/python", "common/python", "services/rollout", "services/learner", "clients/python", "fixture",
         "benchmarks"]  # setup.py ROOTS: the device has no install, `fastgrpo` is a namespace over these
sys.path[:0] = [str(ROOT / r) for r in ROOTS]
KILL_GRACE_S = 5


def card_slug(card: str, cpu: bool) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA GeForce RTX 4090" -> "rtx-4090"; "cpu" on a CPU."""
    if cpu:
        return "cpu"
    words = [w for w in re.split(r"[^A-Za-z0-9]+", card) if w and w.lower() not in ("nvidia", "geforce", "tesla")]
    model = next((w for w in words if re.fullmatch(r"[A-Za-z]+\d+[A-Za-z]*", w)), None)
    return (model or "-".join(words[:3]) or "gpu").lower()


class Log:
    """Prints and appends to $OUT/log.txt (the subprocesses' output goes through it too)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")


def stash(stash_dir: Path) -> None:
    pieces = sorted((ROOT / ".gpu").glob("part-*"))
    if not pieces:
        raise SystemExit("stash: no .gpu/part-* in this call (carry them)")
    stash_dir.mkdir(parents=True, exist_ok=True)
    for p in pieces:
        shutil.copy(p, stash_dir / p.name)
    for p in sorted(stash_dir.glob("part-*")):
        print(f"{p}  {p.stat().st_size} bytes")


def unpack(stash_dir: Path, cache: Path, log: Log) -> None:
    """Reassembles the stashed pieces (part-0, part-1, ... in order) and unpacks them into the cache."""
    pieces = sorted(stash_dir.glob("part-*"), key=lambda p: int(p.name.split("-")[1]))
    if not pieces:
        log(f"no pieces in {stash_dir}: the fixture must already be in {cache}")
        return
    data = b"".join(p.read_bytes() for p in pieces)
    log(f"unpacking {len(pieces)} pieces ({len(data)} bytes) into {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    try:  # gzip checks its CRC: a missing or damaged piece fails here, not in a benchmark
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(cache, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SystemExit(f"run: pieces incomplete or damaged ({[p.name for p in pieces]}: {e}): was the machine "
                         "given back between the calls? Carry every piece again") from e


def header(log: Log) -> None:
    import torch
    import transformers

    if shutil.which("nvidia-smi"):
        log(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.rstrip())
    log(f"python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} "
        f"{torch.cuda.is_available()} transformers {transformers.__version__}")
    from fastgrpo.bench.common import commit

    log(f"commit {commit()}")


def run_section(name: str, timeout: float, smoke: bool, env: dict, log: Log) -> dict:
    """One section in its own subprocess (its own process group, so a timeout ends all of it)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "section", name] + (["--cpu-smoke"] if smoke else [])
    log(f"=== {name} (timeout {timeout:.0f} s)")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    pump = threading.Thread(target=lambda: [log(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    pump.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    pump.join(timeout=5)
    seconds = time.perf_counter() - t0
    status = "timed out" if timed_out else "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    log(f"=== {name}: {status} after {seconds:.0f} s")
    return {"section": name, "status": status, "exit": proc.returncode, "seconds": seconds, "timeout_s": timeout}


def tag_card(path: Path, card: str) -> None:
    """Names the card in a file a bench suite wrote (it records machine.gpu only)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # absent, or cut off mid-write by a timeout
    if doc.get("card") != card:
        path.write_text(json.dumps({"suite": doc.get("suite"), "card": card, **doc}, indent=1))


def summary(out: Path, log: Log) -> None:
    for path in sorted(out.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            log(f"--- {path.name}: unreadable (cut off mid-write?)")
            continue
        log(f"--- {path.name}: {doc.get('suite')} on {doc.get('card')}"
            + (f", C_peak {doc['c_peak']:.0f} ({doc['c_peak_source']})" if "c_peak" in doc else ""))
        for r in doc.get("records", []):
            suite = doc.get("suite")
            if suite == "plain":
                log(f"{r['model']:8s} B={r['batch_size']:4d} compile={r['compile']}  {r['tokens_per_s']:10.1f} tok/s  "
                    f"bound {r['tokens_per_s_bandwidth_bound']:10.1f} ({r['fraction_of_bound']:.1%})  "
                    f"engine built in {r['engine_build_s']:.1f} s")
            elif suite == "knee":
                log(f"{r['model']:8s} {'compiled' if r.get('compiled') else 'eager':8s} C_peak {r['c_peak']:.1f}"
                    f"{' (past the sweep)' if r['c_peak_past_sweep'] else ''}  "
                    f"1-token forward {r['points'][0][1] * 1e3:.2f} ms, bandwidth floor {r['step_floor_ms']:.3f} ms")
            elif suite == "spec":
                log(f"B={r['batch_size']:4d}  plain {r['tokens_per_s_plain']:9.1f}  spec {r['tokens_per_s_spec']:9.1f} "
                    f"tok/s  x{r['speedup']:.2f}  accept {r['acceptance_length']:.2f}")
            elif suite == "concurrency":
                log(f"{r['workload']:9s} B={r['batch_size']:4d} {r['mode']:8s} {r['tokens_per_s']:9.1f} tok/s  "
                    f"x{r['speedup_vs_off']:.3f}  accept {r['acceptance_length']:.2f}")
            elif suite == "gpu-run":
                log(f"{r['section']:14s} {r['status']:18s} {r['seconds']:5.0f} s of {r['timeout_s']:.0f}")


def run(smoke: bool, out: Path, stash_dir: Path) -> int:
    import torch

    import sections
    from fastgrpo.bench.common import write_results

    t_start = time.perf_counter()
    plan = sections.CPU_SMOKE if smoke else sections.GPU
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.txt")
    header(log)
    try:
        if not smoke:
            if not torch.cuda.is_available():
                raise SystemExit("no GPU visible: run with --cpu-smoke on a CPU")
            from fastgrpo.fixture import cache_root

            unpack(stash_dir, cache_root(), log)
        fixture, draft = sections.fixture_dirs(plan.preset)  # fails fast: nothing trains
    except SystemExit as e:
        log(f"run: {e}; no section runs")
        return 1
    log(f"fixture {fixture} with draft {draft.name}")
    card = sections.card()
    slug = card_slug(card, cpu=not torch.cuda.is_available())
    for suite in set(sections.SUITE.values()) | {"run"}:  # this run's files start empty
        for old in out.glob(f"{suite}-{slug}.*"):
            old.unlink()
    env = dict(os.environ, OUT=str(out), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT / r) for r in ROOTS] + os.environ.get("PYTHONPATH", "").split(
                   os.pathsep)).rstrip(os.pathsep))
    names = list(plan.budgets)
    outcomes = []
    for i, name in enumerate(names):
        # until the run's deadline less the budgets of the sections after it: what an earlier one
        # left unused goes to this one, and an overrun (a slow unpack) comes out of it alone
        left = plan.total_s - (time.perf_counter() - t_start) - sum(plan.budgets[n] for n in names[i + 1:])
        if left < 5:
            outcomes.append({"section": name, "status": "skipped (no time left)", "exit": None, "seconds": 0.0,
                             "timeout_s": max(left, 0.0)})
            log(f"=== {name}: skipped, {left:.0f} s left for it")
        else:
            outcomes.append(run_section(name, left, smoke, env, log))
        tag_card(sections.results_path(out, sections.SUITE[name], slug), card)
        write_results(out / f"run-{slug}.json", "gpu-run", outcomes, card=card, plan=plan.name, budgets=plan.budgets,
                      total_s=plan.total_s)
    log(f"=== summary ({time.perf_counter() - t_start:.0f} s)")
    summary(out, log)
    return 0 if all(o["status"] == "ok" for o in outcomes) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commands", nargs="*", help="stash, run (in that order; default with --cpu-smoke: run)")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section on this CPU at tiny sizes, "
                        "with the default fixture from the local cache (nothing unpacked, nothing trained)")
    args = parser.parse_args()
    if args.commands[:1] == ["section"]:  # `section NAME`: one section's subprocess (run_section)
        import torch

        import sections

        plan = sections.CPU_SMOKE if args.cpu_smoke else sections.GPU
        slug = card_slug(sections.card(), cpu=not torch.cuda.is_available())
        sections.SECTIONS[args.commands[1]](plan, Path(os.environ["OUT"]), slug)
        return 0
    commands = args.commands or (["run"] if args.cpu_smoke else [])
    if not commands or set(commands) - {"stash", "run"}:
        parser.error("commands: stash and/or run")
    stash_dir = Path(os.environ.get("STASH", "/root/fxparts"))
    if "stash" in commands and not args.cpu_smoke:
        stash(stash_dir)
    if "run" in commands:
        if "OUT" not in os.environ:
            parser.error("set OUT to the folder results go to")
        return run(args.cpu_smoke, Path(os.environ["OUT"]), stash_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
