"""The learner's copy of the policy: loading (full or LoRA), and log-probs of sampled completions."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from fastgrpo.learner.algo import token_logprobs


@dataclass(frozen=True)
class SequenceBatch:
    """Prompt + completion token ids, right-padded, with the completion positions marked."""

    input_ids: torch.Tensor  # (B, S) long
    attention_mask: torch.Tensor  # (B, S) long, 1 on real tokens
    completion_mask: torch.Tensor  # (B, T) bool, 1 where completion token t is real
    completion_ids: torch.Tensor  # (B, T) long
    prompt_lengths: torch.Tensor  # (B,) long

    @staticmethod
    def build(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> "SequenceBatch":
        assert len(prompts) == len(completions)
        B = len(prompts)
        S = max(len(p) + len(c) for p, c in zip(prompts, completions))
        T = max(1, max(len(c) for c in completions))
        input_ids = torch.full((B, S), pad_id, dtype=torch.long)  # (B, S)
        attention = torch.zeros(B, S, dtype=torch.long)  # (B, S)
        comp_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
        comp_mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            seq = list(p) + list(c)
            input_ids[b, : len(seq)] = torch.tensor(seq)
            attention[b, : len(seq)] = 1
            comp_ids[b, : len(c)] = torch.tensor(c, dtype=torch.long)
            comp_mask[b, : len(c)] = True
        lengths = torch.tensor([len(p) for p in prompts])  # (B,)
        return SequenceBatch(input_ids, attention, comp_mask, comp_ids, lengths)


def completion_logprobs(model: torch.nn.Module, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """log p(completion token t | prefix) under softmax(logits / T): (B, T), 0 at padding.

    One forward over prompt + completion; the logits that predict completion token t sit at
    position prompt_length + t - 1.
    """
    dev = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), use_cache=False)
    B, T = batch.completion_ids.shape
    idx = batch.prompt_lengths.to(dev)[:, None] - 1 + torch.arange(T, device=dev)[None, :]  # (B, T)
    idx = idx.clamp(max=out.logits.shape[1] - 1)
    logits = out.logits.gather(1, idx[:, :, None].expand(B, T, out.logits.shape[-1]))  # (B, T, V)
    logp = token_logprobs(logits, batch.completion_ids.to(dev), temperature if temperature > 0 else 1.0)  # (B, T)
    return logp * batch.completion_mask.to(dev)


def load_policy(model_dir: str, device: str, lora: bool, lora_r: int, lora_alpha: float, lora_targets: list[str]):
    """The trainable policy in float32: the HF model itself, or the model wrapped with peft LoRA adapters."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.config.use_cache = False
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=lora_targets, lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """For a LoRA policy, the base model (the KL reference when training LoRA)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model
