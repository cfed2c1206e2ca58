#!/usr/bin/env bash
# The GPU benchmarks of the bench fixture on an H100 (two device calls), from the repository root.
#
#   bash benchmarks/device/h100.sh stash        # a call carrying .gpu/part-0: keeps it in $STASH
#   bash benchmarks/device/h100.sh stash run    # the next call, carrying the last piece
#
# The fixture (benchmarks/device/pack_fixture.py: bf16 target + draft, ~100 MB as .tar.gz pieces)
# is larger than one call may carry, so each call stashes its piece on the machine, which stays
# warm only ~30 s between calls. `run` reassembles and unpacks the pieces into the fixture cache,
# checks that the benchmarks will find the fixture there (a cache miss would train it for half an
# hour), then runs spec, concurrency (grpo, grpo-tail) and concurrency (fixed B sweep), each
# under a timeout, writing JSON/PNG and log.txt straight into $OUT, and prints a summary.
#
# Environment: OUT (required), STASH (/root/fxparts), FASTGRPO_CACHE (~/.cache/fastgrpo),
# PYTHON (python3), QUICK=1 (every bench --quick: a CPU dry run), T_SPEC / T_GRPO / T_FIXED
# (timeouts in seconds).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
: "${OUT:?set OUT to the folder results go to}"
STASH=${STASH:-/root/fxparts}
export FASTGRPO_CACHE=${FASTGRPO_CACHE:-$HOME/.cache/fastgrpo}
PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
# estimated on an H100 (a launch-bound 59M target, ~6 ms a plain step, ~25 ms a speculative one):
# ~50 s, ~1 min and ~1.5 min after ~20 s of unpacking and checks; the timeouts bound the whole run
# at under 7 min even if all three run out (results are written after every measurement)
T_SPEC=${T_SPEC:-90} T_GRPO=${T_GRPO:-120} T_FIXED=${T_FIXED:-170}

stash() {
    mkdir -p "$STASH"
    cp -v .gpu/part-* "$STASH"/ || { echo "stash: no .gpu/part-* in this call (carry them)"; return 1; }
    ls -l "$STASH"
}

unpack() {
    mkdir -p "$FASTGRPO_CACHE"
    local parts
    parts=$(ls "$STASH"/part-* | sort -V)
    echo "unpacking $(echo $parts | wc -w) pieces ($(cat $parts | wc -c) bytes) into $FASTGRPO_CACHE"
    # gzip checks its CRC: a missing or damaged piece fails here, not in a benchmark
    cat $parts | tar xz -C "$FASTGRPO_CACHE" || { echo "run: pieces incomplete or damaged ($parts): was the machine given back between the calls? Carry every piece again"; return 1; }
}

preflight() {
    "$PY" - <<'EOF'
import torch
from fastgrpo.bench.cli import main  # noqa: F401  (every suite's imports resolve)
from fastgrpo.bench.common import load_target, placement
from fastgrpo.fixture import cache_root, fixture_name, get_recipe
from fastgrpo.fixture.build import is_complete
from fastgrpo.fixture.draft import PRESET_RECIPES, draft_hash
from fastgrpo.rollout.speculative.draft_head import DraftHead

fixture = cache_root() / fixture_name("bench", get_recipe("bench"))
draft = fixture / f"draft-{draft_hash(PRESET_RECIPES['bench'])}"
assert is_complete(fixture), f"{fixture} is no complete fixture: the benchmarks would train one"
assert (draft / "draft_config.json").is_file(), f"{draft} is missing: the benchmarks would train a draft"
model = load_target(fixture)
head = DraftHead.load(draft, model)
with torch.inference_mode():
    logits = model(torch.tensor([[5, 6, 7]], device=model.device)).logits
print(f"fixture {fixture.name} + {draft.name}: {placement(model)}, draft on "
      f"{next(head.parameters()).device} {next(head.parameters()).dtype}, logits finite {bool(logits.isfinite().all())}")
EOF
}

bench() {  # bench NAME SECONDS ARGS...: one suite under a timeout; a failure does not stop the next
    local name=$1 limit=$2
    shift 2
    local quick=()
    [ "$QUICK" = 1 ] && quick=(--quick)
    echo "=== $name (timeout ${limit}s): fastgrpo-bench $* ${quick[*]}"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$PY" -m fastgrpo.bench.cli "$@" "${quick[@]}"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

summary() {
    "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    doc = json.loads(path.read_text())
    print(f"--- {path.name}: {doc['suite']} on {doc.get('device')} {doc.get('dtype')}, {doc['machine'].get('gpu', doc['machine']['cpu'])}"
          + (f", C_peak {doc['c_peak']:.0f} ({doc['c_peak_source']})" if "c_peak" in doc else ""))
    for r in doc["records"]:
        if doc["suite"] == "spec":
            print(f"B={r['batch_size']:4d}  plain {r['tokens_per_s_plain']:9.1f}  spec {r['tokens_per_s_spec']:9.1f} tok/s  "
                  f"x{r['speedup']:.2f}  accept {r['acceptance_length']:.2f}")
        else:
            print(f"{r['workload']:9s} B={r['batch_size']:4d} {r['mode']:8s} {r['tokens_per_s']:9.1f} tok/s  "
                  f"x{r['speedup_vs_off']:.3f}  accept {r['acceptance_length']:.2f}")
EOF
}

run() {
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 MPLBACKEND=Agg
    # no install on the device: `fastgrpo` is a namespace package spread over these roots (setup.py ROOTS)
    export PYTHONPATH="$ROOT/proto/python:$ROOT/common/python:$ROOT/services/rollout:$ROOT/services/learner:$ROOT/clients/python:$ROOT/fixture:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi || echo "(no nvidia-smi)"
    "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__)"
    git rev-parse HEAD 2>/dev/null || echo "(no .git here: the results' commit reads unknown)"
    if ls "$STASH"/part-* >/dev/null 2>&1; then
        unpack || return 1
    else
        echo "no pieces in $STASH: the fixture must already be in $FASTGRPO_CACHE"
    fi
    preflight || { echo "preflight failed: no benchmark runs (see above)"; return 1; }
    bench spec "$T_SPEC" spec --out "$OUT/spec.json" --width 4 --depth 6 --n-verify 20
    bench grpo "$T_GRPO" concurrency --workloads grpo,grpo-tail --repeats 3 --out "$OUT/concurrency-grpo.json"
    bench fixed "$T_FIXED" concurrency --workloads fixed --repeats 2 --out "$OUT/concurrency-fixed.json"
    summary
    ls -l "$OUT"
}

[ $# -gt 0 ] || { echo "usage: $0 stash|run ..."; exit 2; }
for cmd in "$@"; do
    case $cmd in
        stash) stash || exit 1 ;;
        run) mkdir -p "$OUT"; run 2>&1 | tee -a "$OUT/log.txt" || exit 1 ;;
        *) echo "unknown subcommand $cmd (stash, run)"; exit 2 ;;
    esac
done
