#!/usr/bin/env bash
# Entry point of the learner image: trains $FASTGRPO_MODEL on the GPU against the rollout service(s).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: learner-entrypoint.sh [--help] [TRAIN ARGS...]

Runs `fastgrpo-learner train --device cuda` against $FASTGRPO_ROLLOUT (rollout:50051; several
replicas comma-separated) with its HTTP side (/metrics, /healthz, /readyz) on port 9401. TRAIN
ARGS go to train as they are and win over these (e.g. `--device cpu`; `fastgrpo-learner train --help`).

  FASTGRPO_MODEL  HF model directory of the policy: the weights the rollout service serves. Unset:
                  the fixture policy from $FASTGRPO_CACHE (/cache), built there on the first start
                  (a few CPU minutes, logged first; /readyz answers 503 with the same text meanwhile).
USAGE
}

case "${1:-}" in -h | --help) usage; exit 0 ;; esac

if [ -z "${FASTGRPO_MODEL:-}" ]; then
    # shellcheck source=docker/first-start.sh
    . "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/first-start.sh"
    first_start_begin 9401 build
    FASTGRPO_MODEL=$(fastgrpo-fixture build | tail -n 1)
    first_start_end
fi
exec fastgrpo-learner train --rollout "${FASTGRPO_ROLLOUT:-rollout:50051}" --model "$FASTGRPO_MODEL" \
    --device cuda --http-host 0.0.0.0 --http-port 9401 "$@"
