"""Layer 3, the scheduler: the continuous-batching engine, its requests and sequences, and the
observer interface through which the layers above learn what happened. Imports speculative and
runtime."""
