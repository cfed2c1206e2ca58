"""Layer 4, draft learning: keeps the draft head aligned with the policy, online from the pairs the
engine captures, or offline from the policy's own rollouts. Imports scheduler, speculative, runtime."""
