#!/usr/bin/env bash
# Entry point of the rollout image: serves $FASTGRPO_MODEL with the draft head $FASTGRPO_DRAFT.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: rollout-entrypoint.sh [--help] [SERVE ARGS...]

Runs `fastgrpo-rollout serve` with gRPC on port 50051 and its HTTP side (/metrics, /healthz, /readyz)
on port 9400. SERVE ARGS go to serve as they are (`fastgrpo-rollout serve --help`).

  FASTGRPO_MODEL  HF model directory to serve. Unset: the fixture policy and, unless FASTGRPO_DRAFT is
                  set, its bootstrapped draft head, both built into $FASTGRPO_CACHE (/cache) on the
                  first start. That start logs first what it builds and about how long it takes (a
                  few CPU minutes), and /readyz answers 503 with the same text until the service runs.
  FASTGRPO_DRAFT  draft head directory (from `fastgrpo-rollout train-draft`); unset with a model of
                  your own: no draft head.
USAGE
}

case "${1:-}" in -h | --help) usage; exit 0 ;; esac

if [ -z "${FASTGRPO_MODEL:-}" ]; then
    # shellcheck source=docker/first-start.sh
    . "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/first-start.sh"
    # the fastgrpo-fixture command that builds what is needed: draft builds the policy, then its draft
    if [ -z "${FASTGRPO_DRAFT:-}" ]; then fixture=draft; else fixture=build; fi
    first_start_begin 9400 "$fixture"
    FASTGRPO_MODEL=$(fastgrpo-fixture build | tail -n 1)
    if [ "$fixture" = draft ]; then FASTGRPO_DRAFT=$(fastgrpo-fixture draft | tail -n 1); fi
    first_start_end
fi
exec fastgrpo-rollout serve --model "$FASTGRPO_MODEL" ${FASTGRPO_DRAFT:+--draft "$FASTGRPO_DRAFT"} \
    --host 0.0.0.0 --port 50051 --http-port 9400 "$@"
