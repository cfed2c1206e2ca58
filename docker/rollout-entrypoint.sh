#!/bin/sh
# Serves $FASTGRPO_MODEL with the draft head $FASTGRPO_DRAFT. Without FASTGRPO_MODEL it serves the
# fixture policy and its bootstrapped draft, built into the shared cache volume on the first start
# (a few minutes), so that `docker compose up` needs no model at hand. Extra arguments go to serve.
set -eu
if [ -z "${FASTGRPO_MODEL:-}" ]; then
    FASTGRPO_MODEL=$(fastgrpo-fixture build | tail -n 1)
    if [ -z "${FASTGRPO_DRAFT:-}" ]; then
        FASTGRPO_DRAFT=$(fastgrpo-fixture draft | tail -n 1)
    fi
fi
exec fastgrpo-rollout serve --model "$FASTGRPO_MODEL" ${FASTGRPO_DRAFT:+--draft "$FASTGRPO_DRAFT"} \
    --host 0.0.0.0 --port 50051 --http-port 9400 "$@"
