"""EAGLE-style draft head: one decoder layer over [token embedding ; target feature].

At position i the head reads the target's final-norm hidden state f_i (what feeds lm_head) and the
embedding of the *next* token x_{i+1}, and predicts the feature f_{i+1}; the target's own lm_head
turns that into logits over x_{i+2}. The embedding and lm_head are the target's modules, shared by
reference and frozen: only `fc` and `layer` belong to the draft (a few percent of a 7B target).

Saved as `draft.safetensors` (fc + layer weights only) and `draft_config.json` (the target config
fields the layer needs, plus what the head was trained against).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fastgrpo.rollout.runtime.layers import decoder_layer

DRAFT_WEIGHTS = "draft.safetensors"
DRAFT_CONFIG = "draft_config.json"


def _decoder_layer_class(config: PretrainedConfig):
    """The target family's decoder layer class (Qwen2DecoderLayer, LlamaDecoderLayer, ...)."""
    import importlib

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    name = arch.replace("ForCausalLM", "DecoderLayer")
    return getattr(module, name)


class DraftHead(torch.nn.Module):
    def __init__(self, config: PretrainedConfig, embed_tokens: torch.nn.Module, lm_head: torch.nn.Module,
                 rotary: torch.nn.Module):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        # the layer is built as the target's layer 0 (same shapes); only its modules are used, by
        # the runner's decoder_layer, so attention-implementation settings do not matter
        self.layer = _decoder_layer_class(config)(config, layer_idx=0)
        # EAGLE drops the first layer's input norm: the fused input is not a residual stream yet
        self.layer.input_layernorm = torch.nn.Identity()
        # shared with the target by reference, never trained or saved here; kept out of
        # state_dict / parameters so optimisers and checkpoints only see the draft's own weights
        object.__setattr__(self, "embed_tokens", embed_tokens)
        object.__setattr__(self, "lm_head", lm_head)
        object.__setattr__(self, "rotary", rotary)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass over whole sequences (training): predicted features (B, S, H).

        tokens (B, S) = x_{i+1}, features (B, S, H) = f_i, positions (B, S), valid (B, S) bool.
        Causal attention among the pairs, padding keys masked (each pair always sees itself).
        """
        B, S = tokens.shape
        x = self.fuse(tokens, features)  # (B, S, H)
        cos, sin = self.rotary(x, positions)  # (B, S, D)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()  # (S, S)
        eye = torch.eye(S, dtype=torch.bool, device=x.device)
        mask = (causal[None] & valid[:, None, :]) | eye[None]  # (B, S, S)
        return decoder_layer(self.layer, x, cos[:, None], sin[:, None], mask[:, None], None, 0, None, None,
                             self.head_dim)

    def fuse(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """tokens (B, Q) = x_{i+1}, features (B, Q, H) = f_i -> the layer's input (B, Q, H)."""
        emb = self.embed_tokens(tokens).to(features.dtype)  # (B, Q, H)
        return self.fc(torch.cat([emb, features], dim=-1))  # (B, Q, H)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted features (..., H) -> logits (..., V) through the target's lm_head."""
        return self.lm_head(features).float()

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, meta: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / DRAFT_WEIGHTS))
        (path / DRAFT_CONFIG).write_text(json.dumps({"target_config": self.config.to_dict(), "meta": meta or {}}, indent=1))

    @staticmethod
    def load(path: str | Path, target: torch.nn.Module) -> "DraftHead":
        """Loads a saved head onto `target` (a HF causal LM whose embedding and lm_head it shares)."""
        path = Path(path)
        saved = json.loads((path / DRAFT_CONFIG).read_text())["target_config"]
        cfg = target.config
        for key in ("hidden_size", "vocab_size", "num_attention_heads", "model_type"):
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(f"draft in {path} was built for {key}={saved.get(key)}, target has {getattr(cfg, key)}")
        head = DraftHead.for_target(target)
        state = load_file(str(path / DRAFT_WEIGHTS))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"draft weights in {path} do not fit: missing {missing}, unexpected {unexpected}")
        return head

    @staticmethod
    def for_target(target: torch.nn.Module) -> "DraftHead":
        """A fresh (randomly initialised) head shaped for `target`, on its device and dtype."""
        param = next(target.parameters())
        cfg = target.config
        head = DraftHead(cfg, target.get_input_embeddings(), target.get_output_embeddings(), target.model.rotary_emb)
        return head.to(device=param.device, dtype=param.dtype)

