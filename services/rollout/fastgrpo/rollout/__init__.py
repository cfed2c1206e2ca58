"""The rollout service, in five layers; each imports only the layers below it (tests/test_layers.py
checks it):

  1. runtime         model runner over HF checkpoints, KV cache, attention masks, sampler
  2. speculative     tree shape and the controller formula, C_peak calibration, the draft head and
                     its runner, verification, the speculative step
  3. scheduler       the engine loop: admission, continuous batching, sequences, request handles;
                     it tells observers what happened (EngineObserver) and runs background work
  4. draft_learning  capture buffer, trainer, online learner (an observer and background work), offline
  5. service         gRPC servicer, weight stores, metrics, HTTP side, config and CLI: the only layer
                     that knows protobuf
"""
