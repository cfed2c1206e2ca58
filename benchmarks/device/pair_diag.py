"""Diagnosis of adaptive speculation with and without the pair gain (online_calibration.PairGain):
off and adaptive engines in lockstep on the GRPO batch (16 prompts x 8) and on 128 prompts through
64 slots, a few rounds each, printing per round both modes' seconds and the adaptive steps' time by
tree size (N_verify; 0 = plain; "prefill"), and writing every step (B, seconds, tokens, N_verify,
prefilled) to $OUT/diag.json.

Run from the repository root with the source roots on PYTHONPATH (see h100.sh), e.g. on the device:
    THREADS=1 OUT=$OUT python3 benchmarks/device/pair_diag.py
Environment: THREADS (torch CPU threads, 1), CPEAK (C_peak, 181: the H100 profile of the bench
fixture), PRESET (fixture, bench), MAXNEW (tokens per sequence, 96), OUT.
"""
import collections, json, math, os, statistics as st, sys, time
import torch
from transformers import AutoTokenizer
from fastgrpo.bench.common import load_target
from fastgrpo.bench.lockstep import lockstep_generation
from fastgrpo.bench.spec import timed_generation
from fastgrpo.fixture import build_fixture
from fastgrpo.fixture.draft import build_draft
from fastgrpo.learner.tasks import format_prompt, synthetic_math
from fastgrpo.rollout.controller import ControllerConfig, SpecPolicy
from fastgrpo.rollout.engine.engine import Engine, EngineConfig, EngineObserver
from fastgrpo.rollout.engine.model_runner import ModelRunner
from fastgrpo.rollout.engine.types import GenerationRequest, SamplingConfig
from fastgrpo.rollout.online_calibration import PairConfig, PairGain
from fastgrpo.rollout.speculative.draft import DraftHead
from fastgrpo.rollout.speculative.drafter import Drafter, TreeShape

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
C = float(os.environ.get("CPEAK", "181"))
fx = build_fixture(os.environ.get("PRESET", "bench"))
model = load_target(fx)
tok = AutoTokenizer.from_pretrained(str(fx))
head = DraftHead.load(build_draft(fx), model)
prompts_all = [tok(format_prompt(p.question))["input_ids"] for p in synthetic_math(seed=0).test]
out = {}

class Obs(EngineObserver):
    def __init__(self, log): self.log, self.eng = log, None
    def step_done(self, r):
        t = self.eng.last_tree
        self.log.append((r.batch_size, r.seconds, r.decode_tokens, t.n_verify if t else 0, len(r.first_token_seconds)))
    def sequence_done(self, *a): pass

def experiment(name, pairs_on, workload, rounds=3):
    policy = SpecPolicy("adaptive", ControllerConfig(c_peak=C), TreeShape(4, 6, 20),
                        pairs=PairGain(PairConfig(enabled=pairs_on)))
    slots = 128 if workload == "grpo" else 64
    logs, engines = {}, {}
    for m in ("off", "adaptive"):
        runner = ModelRunner(model, slots, headroom=policy.max_nodes())
        drafter = Drafter(head, slots, runner.cache.max_len + policy.draft_headroom())
        logs[m] = []
        o = Obs(logs[m])
        engines[m] = o.eng = Engine(runner, (tok.eos_token_id,), EngineConfig(max_running=slots), drafter, policy, observer=o)
        timed_generation(engines[m], prompts_all[:2], 1, 1.0, 16, 0, m)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=int(os.environ.get("MAXNEW", "96")), seed=0)
    if workload == "grpo":
        req = lambda mode: [GenerationRequest("b", tuple(tuple(p) for p in prompts_all[100:116]), 8, sampling, mode)]
    else:
        req = lambda mode: [GenerationRequest("b", tuple(tuple(p) for p in prompts_all[:128]), 1, sampling, mode)]
    res = []
    for r in range(rounds):
        for l in logs.values(): l.clear()
        t0 = time.perf_counter()
        x = lockstep_generation(engines, req, first=r)
        wall = time.perf_counter() - t0
        steps = {m: list(logs[m]) for m in logs}
        ratio = x["off"]["seconds"] / x["adaptive"]["seconds"]
        print(f"{name} round {r}: off {x['off']['seconds']:.3f}s adaptive {x['adaptive']['seconds']:.3f}s ratio {ratio:.3f} wall {wall:.2f}s "
              f"steps off {len(steps['off'])} adaptive {len(steps['adaptive'])}", flush=True)
        # per tree-size: adaptive steps' count, total s, median ms
        agg = collections.defaultdict(list)
        for B, s, t, n, pf in steps["adaptive"]:
            agg[("prefill" if pf else n)].append(s)
        offagg = [s for B, s, t, n, pf in steps["off"] if not pf]
        print("   off decode: n=%d total %.3fs med %.1fms max %.1fms" % (len(offagg), sum(offagg), st.median(offagg) * 1e3, max(offagg) * 1e3))
        for k in sorted(agg, key=str):
            v = agg[k]
            print(f"   adaptive N={k}: n={len(v)} total {sum(v):.3f}s med {st.median(v)*1e3:.1f}ms max {max(v)*1e3:.1f}ms")
        res.append({"ratio": ratio, "steps": steps})
    for e in engines.values(): e.shutdown()
    out[name] = res

for threads in [os.environ.get("THREADS", "1")]:
    experiment("grpo-pairs", True, "grpo")
    experiment("grpo-nopairs", False, "grpo")
    experiment("fixed64-pairs", True, "fixed", 2)
    experiment("fixed64-nopairs", False, "fixed", 2)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "diag.json"), "w"))
