"""Layer 2, speculative decoding: tree shapes and the concurrency-aware controller (pure math), C_peak
calibration, the EAGLE-style draft head and its runner, lossless verification, and the speculative
step that ties them together. Imports the runtime only."""
