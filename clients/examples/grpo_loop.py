"""A GRPO trainer of your own, with the fastgrpo rollout service doing the generation.

Everything a trainer needs from fastgrpo is in `fastgrpo.client`: generate rollouts with their
logprobs, then push the weight change back. The model, the loss and the optimizer are plain
PyTorch; the task (synthetic word problems with a checkable answer) comes from fastgrpo's learner.

    fastgrpo-rollout serve --model DIR --port 50051 &
    python clients/examples/grpo_loop.py --rollout 127.0.0.1:50051 --model DIR --steps 20
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo.client import RolloutClient, Sampling, WeightMirror
from fastgrpo.learner.tasks import RewardFn, correctness_reward, format_prompt, synthetic_math


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
    """log p(token | prefix) of every completion token under `model`, one (C_n,) tensor per sequence."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # (N, T), right-padded
    mask = torch.zeros(len(seqs), width, dtype=torch.long)  # (N, T)
    for n, s in enumerate(seqs):
        ids[n, : len(s)] = torch.tensor(s)
        mask[n, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (N, T, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]  # (N, T-1)
    # token t of the sequence is predicted at position t - 1
    return [logp[n, len(p) - 1 : len(p) - 1 + len(c)] for n, (p, c) in enumerate(zip(prompts, completions))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollout", required=True, help="HOST:PORT of the rollout service")
    ap.add_argument("--model", required=True, help="HF model directory the service was started with")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8, help="Q: prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--clip", type=float, default=0.2, help="PPO clip epsilon")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--token", default=None, help="bearer token, if the service requires one")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    problems = synthetic_math(seed=args.seed).train
    reward_fn = RewardFn()  # correctness + 0.1 * format
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    with RolloutClient(args.rollout, token=args.token) as client:
        client.wait_ready()
        served = client.status()
        # the mirror is what the service serves; deltas are computed against it and pushes verified by it
        mirror = WeightMirror.of(model, served.model.dtype, version=served.policy_version)
        if mirror.checksum != served.policy_checksum:
            raise SystemExit(f"{args.rollout} does not serve the weights in {args.model} (it is at version "
                             f"{served.policy_version}); restart it or point --model at what it serves")

        for step in range(1, args.steps + 1):
            t0 = time.monotonic()
            batch = rng.sample(problems, args.prompts)
            texts = [format_prompt(p.question) for p in batch]
            # 1. rollouts: Q prompts x G samples, with the per-token logprobs of the policy that sampled them
            sampling = Sampling(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed * 100_003 + step)
            rollouts = client.generate_batch(texts, args.group, sampling).flat()  # prompt-major: Q groups of G

            # 2. rewards and group-normalised advantages
            problem_of = [batch[c.prompt_index] for c in rollouts]
            rewards = torch.tensor([reward_fn(c.text, p) for c, p in zip(rollouts, problem_of)])  # (Q*G,)
            r = rewards.view(args.prompts, args.group)  # (Q, G)
            advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)  # (Q*G,)

            # 3. clipped surrogate; the service's logprobs are the old policy's (temperature 1.0), so the
            #    ratio starts at 1 up to float noise (max|ratio-1| below shows how close)
            model.train()
            prompt_ids = [tokenizer(texts[c.prompt_index])["input_ids"] for c in rollouts]  # as the service tokenizes
            new_logps = completion_logprobs(model, prompt_ids, [c.token_ids for c in rollouts])
            losses, drift = [], 0.0
            for c, new, adv in zip(rollouts, new_logps, advantages):
                ratio = torch.exp(new - torch.tensor(c.logprobs))  # (C,)
                clipped = torch.clamp(ratio, 1 - args.clip, 1 + args.clip)
                losses.append(-torch.min(ratio * adv, clipped * adv).mean())  # mean over the sequence's tokens
                drift = max(drift, (ratio.detach() - 1).abs().max().item())
            loss = torch.stack(losses).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            # 4. push what changed; the service applies it between decode steps and bumps its version
            delta = mirror.dense_delta(model)
            pushed = client.push_weights(delta, "dense_delta", mirror=mirror)[0] if delta else None
            accuracy = sum(correctness_reward(c.text, p) for c, p in zip(rollouts, problem_of)) / len(rollouts)
            print(f"step {step}  reward {rewards.mean():.3f}  accuracy {accuracy:.3f}  max|ratio-1| {drift:.1e}  "
                  f"version {pushed.version if pushed else mirror.version}  {time.monotonic() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
