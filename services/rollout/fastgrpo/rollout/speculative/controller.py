"""Concurrency-aware speculation: the tree shape for the live batch size (FastGRPO, section 4.1).

The target verifies about C_peak tokens per forward before a step stops being memory-bound; with B
sequences running each can afford N_verify = C_peak / B tree nodes. Width grows linearly with the
budget and depth logarithmically (acceptance decays with depth):

    N_verify = min(floor(C_peak / B), N_max)          speculation off when N_verify < 2
    K        = min(N_verify - 1, K_max)
    L        = clamp(floor(log2(N_verify / alpha)), L_min, L_max)

L is further capped at N_verify - 1 (a tree of N_verify nodes is never deeper, so deeper draft
levels could not be verified and would only cost draft forwards), and the tree by what K and L can
hold (K + (L-1) K^2 candidates plus the root). C_peak and alpha themselves may move while the
server runs (online_calibration.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fastgrpo.common.config import help_field
from fastgrpo.rollout.speculative.online_calibration import OnlineCalibrator
from fastgrpo.rollout.speculative.text_drafts import TEXT_SOURCES, TextDrafts
from fastgrpo.rollout.speculative.tree import TreeShape
from fastgrpo.rollout.speculative.verify import VERIFY_RULES

SpecMode = Literal["adaptive", "static", "off"]
SPEC_MODES: tuple[SpecMode, ...] = ("adaptive", "static", "off")
DRAFT_SOURCES = ("head",) + TEXT_SOURCES


@dataclass(frozen=True)
class ControllerConfig:
    """The adaptive formula's constants (flags without a prefix: --c-peak, --n-max, ...)."""

    c_peak: float = help_field(160.0, "adaptive: tokens per target forward at the compute knee (160 is the paper's GPU figure; measure yours with --calibration)")
    n_max: int = help_field(160, "adaptive: largest N_verify")
    k_max: int = help_field(8, "adaptive: largest tree width K")
    l_min: int = help_field(3, "adaptive: smallest tree depth L")
    l_max: int = help_field(5, "adaptive: largest tree depth L")
    alpha: float = help_field(0.75, "adaptive: L = floor(log2(N_verify / alpha)); the start value when --c-peak-refine refines it")


@dataclass(frozen=True)
class SpecConfig:
    """How the service speculates with a draft (flags --spec-*): the mode, the verification rule and
    the static tree."""

    mode: SpecMode = help_field("adaptive", "adaptive (trees sized from the live batch size and C_peak), static (a fixed K, L, N_verify) or off")
    verify: Literal["rrs", "match"] = help_field("rrs", "how sampled sequences verify: rrs (children drawn from the draft, recursive rejection sampling) or match (top-K children, sample-matching); greedy always matches exactly")
    width: int = help_field(4, "static K: children per tree node and nodes expanded per level")
    depth: int = help_field(5, "static L: tree depth (draft steps per verify step)")
    n_verify: int = help_field(16, "static N_verify: tree nodes (root included) verified per sequence and step")
    sources: str = help_field("head", "where drafts come from, comma-separated: head (the draft model), siblings (what the other samples of the same prompt have written so far), history (earlier completions of the same prompt, kept across requests); text chains from siblings and history join the head's tree (sampled sequences: their confident tokens as lead children tested before the head's drawn ones; greedy: competing with its top-K candidates); without head, text alone drafts and no --draft is needed")
    history_tokens: int = help_field(1_000_000, "history: completion tokens kept in all, the least recently used prompts dropped first (about 40 bytes a token)")
    history_max_age: int = help_field(4, "history: completions written more than this many policy versions ago are dropped")
    choose: bool = help_field(True, "adaptive: each step with a tree runs it with the head, with the text chains alone, or plainly, whichever is measured fastest at the live batch size (off: always as sized)")

    def __post_init__(self):
        if self.mode not in SPEC_MODES:
            raise ValueError(f"--spec-mode must be one of {', '.join(SPEC_MODES)}; got {self.mode!r}")
        if self.verify not in VERIFY_RULES:
            raise ValueError(f"--spec-verify must be one of {', '.join(VERIFY_RULES)}; got {self.verify!r}")
        TreeShape(self.width, self.depth, self.n_verify)  # a static tree that cannot be built is refused here
        sources = self.source_list
        unknown = [s for s in sources if s not in DRAFT_SOURCES]
        if unknown or not sources:
            raise ValueError(f"--spec-sources takes a comma-separated list of {', '.join(DRAFT_SOURCES)}; got {self.sources!r}")
        if self.history_tokens < 0 or self.history_max_age < 0:
            raise ValueError(f"--spec-history-tokens and --spec-history-max-age must be >= 0; got {self.history_tokens}, {self.history_max_age}")

    @property
    def head(self) -> bool:
        """Whether the draft head is a source (without it, text chains alone draft)."""
        return "head" in self.source_list

    @property
    def source_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.sources.split(",") if s.strip())

    def text_drafts(self) -> TextDrafts | None:
        """The engine's text drafting for these sources (None: the head alone drafts)."""
        text = [s for s in self.source_list if s in TEXT_SOURCES]
        return TextDrafts(text, self.history_tokens, self.history_max_age) if text else None

    @property
    def static_tree(self) -> TreeShape:
        return TreeShape(self.width, self.depth, self.n_verify)


def adaptive_tree(batch_size: int, cfg: ControllerConfig, c_peak: float | None = None,
                  alpha: float | None = None) -> TreeShape | None:
    """The tree for B running sequences, or None when speculation does not pay (N_verify < 2).
    c_peak and alpha override cfg's (the live, refined values)."""
    assert batch_size >= 1
    n = min(math.floor((cfg.c_peak if c_peak is None else c_peak) / batch_size), cfg.n_max)
    if n < 2:
        return None
    k = min(n - 1, cfg.k_max)
    depth = min(max(math.floor(math.log2(n / (cfg.alpha if alpha is None else alpha))), cfg.l_min), cfg.l_max, n - 1)
    pool = k + (depth - 1) * k * k
    return TreeShape(width=k, depth=depth, n_verify=min(n, pool + 1))


@dataclass(frozen=True)
class SpecController:
    """Which tree each decode step uses: adaptive (from B), static (fixed), or off; and how sampled
    sequences verify it (rrs: children drawn from the draft; match: top-K children, sample-matching)."""

    mode: SpecMode = "adaptive"
    controller: ControllerConfig = ControllerConfig()
    static_tree: TreeShape = TreeShape(width=4, depth=5, n_verify=16)
    verify: str = "rrs"
    calibrator: OnlineCalibrator | None = None  # holds the live C_peak when refined online
    choose: bool = True  # adaptive steps take the way measured fastest (engine.StepChooser), plain decoding included

    @staticmethod
    def of(spec: SpecConfig, controller: ControllerConfig, calibrator: OnlineCalibrator | None = None) -> "SpecController":
        return SpecController(spec.mode, controller, spec.static_tree, spec.verify, calibrator, spec.choose)
    @property
    def c_peak(self) -> float:
        return self.calibrator.c_peak if self.calibrator is not None else self.controller.c_peak

    @property
    def alpha(self) -> float:
        """The live alpha: the configured one, shifted by whole tree levels when refined online."""
        shift = self.calibrator.depth_shift if self.calibrator is not None else 0
        return self.controller.alpha / 2.0**shift

    def step_c_peak(self) -> float:
        """The C_peak this decode step sizes adaptive trees for (call once per step: the online
        calibrator explores around its estimate on some steps)."""
        return self.calibrator.step_c_peak() if self.calibrator is not None else self.controller.c_peak

    @property
    def probing(self) -> bool:
        """Whether the latest step_c_peak is the online calibrator's probe of another tree size
        (its trees must then be verified, whatever decodes fastest: the latency is the point)."""
        return self.calibrator is not None and self.calibrator.probing

    def tree_for(self, batch_size: int, mode: SpecMode | None = None, c_peak: float | None = None) -> TreeShape | None:
        mode = mode or self.mode
        if mode == "off":
            return None
        if mode == "static":
            return self.static_tree
        alpha = self.alpha
        live = adaptive_tree(batch_size, self.controller, self.c_peak, alpha)
        if c_peak is None or live is None:
            # an exploring step never turns speculation on where the estimate says it does not pay:
            # at such a B the plain forward's B tokens already sit above C_peak
            return live
        return adaptive_tree(batch_size, self.controller, c_peak, alpha)

    def max_nodes(self) -> int:
        """Most tree nodes any step can verify: the KV-cache headroom a sequence needs."""
        return max_tree_nodes(self.controller, self.static_tree,
                              self.calibrator.cfg.alpha_levels if self.calibrator is not None else None)

    def draft_headroom(self) -> int:
        """Most draft-cache positions a tree needs past the settled tokens (K per expanded level)."""
        return max(self.static_tree.width * self.static_tree.depth, self.controller.k_max * self.controller.l_max)


def max_tree_nodes(controller: ControllerConfig, static_tree: TreeShape, alpha_levels: int | None) -> int:
    """Most nodes a tree of either mode can have. alpha_levels None: C_peak and alpha stay as
    configured; else they are refined online, so C_peak may grow until N_verify reaches N_max and
    trees deepen by up to alpha_levels levels."""
    top, alpha = ((controller.n_max, controller.alpha / 2.0**alpha_levels) if alpha_levels is not None
                  else (None, None))
    adaptive = adaptive_tree(1, controller, top, alpha)
    return max(static_tree.n_verify, adaptive.n_verify if adaptive else 0)
