#!/bin/sh
# Trains $FASTGRPO_MODEL (the fixture policy from the shared cache volume when unset: the weights the
# rollout service serves) against the rollout service. Extra arguments go to `fastgrpo-learner train`.
set -eu
FASTGRPO_MODEL=${FASTGRPO_MODEL:-$(fastgrpo-fixture build | tail -n 1)}
exec fastgrpo-learner train --rollout "${FASTGRPO_ROLLOUT:-rollout:50051}" --model "$FASTGRPO_MODEL" \
    --http-host 0.0.0.0 --http-port 9401 "$@"
