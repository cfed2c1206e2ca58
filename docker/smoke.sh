#!/usr/bin/env bash
# Smoke test of the compose stack on a GPU node with Docker, Compose v2 and the NVIDIA Container
# Toolkit: builds both images, brings the stack up, waits until the learner has done 5 GRPO steps
# and the Grafana dashboard's acceptance-length panel has data in Prometheus, then tears it down.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: docker/smoke.sh [--two-gpus | --replicas] [--timeout-min N] [--print-queries] [--help]

Builds the rollout and learner images, starts the stack as compose project "fastgrpo-smoke" (fresh
volumes, so the first start trains the fixture and its draft: several minutes), and passes once
  - the learner has done 5 GRPO steps (fastgrpo_learner_steps_total on localhost:9401/metrics),
  - the first start said what it builds in the rollout's /readyz (unless FASTGRPO_MODEL is set),
  - rollout and learner see the GPUs of the layout (nvidia-smi in each container),
  - Prometheus (localhost:9090) scrapes every rollout replica, and each query of the dashboard's
    "Acceptance length" panel, read from docker/grafana/dashboards/fastgrpo.json, has data.
The stack and its volumes are removed on exit, passed or not. It publishes the stack's ports
(50051, 9400-9402, 9090, 3000): stop a running stack first.

  (none)            one GPU: docker-compose.yml, rollout and learner share GPU 0
  --two-gpus        two GPUs: --env-file docker/two-gpus.env, the learner on GPU 1
  --replicas        two GPUs, two rollout replicas: -f docker-compose.replicas.yml
  --timeout-min N   give up after N minutes (default 60)
  --print-queries   print the Prometheus queries of the panel and exit (needs python3 only)
USAGE
}

panel_title="Acceptance length"  # the dashboard panel whose queries must have data
rate_window=2m                   # stands in for Grafana's $__rate_interval (5 s scrapes)
steps_wanted=5

layout=one-gpu
timeout_min=60
print_queries=0
while [ $# -gt 0 ]; do
    case $1 in
        --two-gpus) layout=two-gpus ;;
        --replicas) layout=replicas ;;
        --timeout-min) timeout_min=${2:?--timeout-min needs a number}; shift ;;
        --print-queries) print_queries=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "smoke.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

repo=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)

# The panel's queries, one a line, with $__rate_interval replaced: read at run time, so that they
# are the dashboard's own
panel_queries() {
    python3 - "$repo/docker/grafana/dashboards/fastgrpo.json" "$panel_title" "$rate_window" <<'PY'
import json, sys
path, title, window = sys.argv[1:]
panels = [p for p in json.load(open(path))["panels"] if p["title"].startswith(title)]
if len(panels) != 1:
    sys.exit(f"smoke.sh: {path} has {len(panels)} panels titled {title!r}..., not one")
for target in panels[0]["targets"]:
    print(target["expr"].replace("$__rate_interval", window))
PY
}

if [ "$print_queries" -eq 1 ]; then
    panel_queries
    exit 0
fi

fail() {
    echo "smoke.sh: FAILED: $*" >&2
    exit 1
}

compose=(docker compose -p fastgrpo-smoke -f "$repo/docker-compose.yml")
gpus=1
rollouts=(rollout)
case $layout in
    two-gpus) compose+=(--env-file "$repo/docker/two-gpus.env"); gpus=2 ;;
    replicas) compose+=(-f "$repo/docker-compose.replicas.yml"); gpus=2; rollouts+=(rollout-2) ;;
esac

for tool in docker python3 curl nvidia-smi; do
    command -v "$tool" >/dev/null || fail "$tool is not on PATH (this script runs on a GPU node with Docker)"
done
docker info >/dev/null 2>&1 || fail "no Docker daemon answers (docker info)"
docker compose version >/dev/null 2>&1 || fail "Compose v2 (docker compose) is missing"
have=$(nvidia-smi -L | grep -c '^GPU ' || true)
[ "$have" -ge "$gpus" ] || fail "the $layout layout needs $gpus GPUs, nvidia-smi lists $have"
queries=$(panel_queries)

teardown() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        "${compose[@]}" ps || true
        "${compose[@]}" logs --tail 40 || true
    fi
    "${compose[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true
    echo "smoke.sh: stack removed; $([ "$status" -eq 0 ] && echo passed || echo failed) ($layout)"
}
trap teardown EXIT

echo "smoke.sh: building the images ($layout)"
"${compose[@]}" build
"${compose[@]}" down --volumes --remove-orphans >/dev/null 2>&1  # a fresh start, even after a killed run
deadline=$((SECONDS + timeout_min * 60))
# `up -d` waits for the rollout to be healthy before it starts the learner: it runs in the background
# while this loop watches the first start
"${compose[@]}" up -d &
up_pid=$!

learner_steps() {
    curl -fsS --max-time 5 http://localhost:9401/metrics 2>/dev/null \
        | awk '$1 == "fastgrpo_learner_steps_total" { print int($2) }' || true
}

saw_first_start=0
next_report=$SECONDS
while :; do
    if [ -n "$up_pid" ] && ! kill -0 "$up_pid" 2>/dev/null; then
        wait "$up_pid" || fail "docker compose up failed"
        up_pid=
    fi
    readyz=$(curl -s --max-time 5 http://localhost:9400/readyz || true)
    case $readyz in *"first start"*) saw_first_start=1 ;; esac
    steps=$(learner_steps)
    [ "${steps:-0}" -ge "$steps_wanted" ] && break
    [ "$SECONDS" -lt "$deadline" ] || fail "no $steps_wanted learner steps within $timeout_min min"
    if [ "$SECONDS" -ge "$next_report" ]; then
        echo "smoke.sh: $((SECONDS / 60)) min: learner steps ${steps:-none yet}; rollout /readyz: ${readyz:-no answer}"
        next_report=$((SECONDS + 60))
    fi
    sleep 5
done
echo "smoke.sh: the learner has done $steps steps"
if [ -n "$up_pid" ]; then
    wait "$up_pid" || fail "docker compose up failed"
fi

if [ -z "${FASTGRPO_MODEL:-}" ] && [ "$saw_first_start" -eq 0 ]; then
    fail "the rollout's /readyz never said 'first start' while the fixture was built"
fi

gpu_of() {
    "${compose[@]}" exec -T "$1" nvidia-smi --query-gpu=uuid --format=csv,noheader
}
learner_gpu=$(gpu_of learner)
[ "$(wc -l <<<"$learner_gpu")" -eq 1 ] || fail "the learner sees $(wc -l <<<"$learner_gpu") GPUs, not one"
if [ "$layout" = two-gpus ]; then
    [ "$(gpu_of rollout)" != "$learner_gpu" ] || fail "rollout and learner share a GPU in the two-GPU layout"
else
    [ "$(gpu_of rollout)" = "$learner_gpu" ] || fail "rollout and learner should share GPU 0"
fi
if [ "$layout" = replicas ]; then
    [ "$(gpu_of rollout-2)" != "$learner_gpu" ] || fail "rollout-2 should have a GPU of its own"
fi

# prometheus_has QUERY: the query's instant result is non-empty and every value is a finite number
prometheus_has() {
    curl -fsS --max-time 10 --get --data-urlencode "query=$1" http://localhost:9090/api/v1/query \
        | python3 -c '
import json, math, sys
result = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if result and all(math.isfinite(float(r["value"][1])) for r in result) else 1)'
}

wait_for_prometheus() {
    local query=$1 until=$((SECONDS + 180))
    until prometheus_has "$query"; do
        [ "$SECONDS" -lt "$until" ] || fail "Prometheus has no data for: $query"
        sleep 5
    done
    echo "smoke.sh: Prometheus has data for: $query"
}

wait_for_prometheus "count(up{job=\"rollout\"} == 1) == ${#rollouts[@]}"
while IFS= read -r query; do
    wait_for_prometheus "$query"
done <<<"$queries"
