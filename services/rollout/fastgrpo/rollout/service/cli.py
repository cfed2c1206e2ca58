"""`fastgrpo-rollout`: the rollout service's command line."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from fastgrpo.common.config import add_dataclass_args, from_args
from fastgrpo.rollout.draft_learning.offline import OfflineConfig
from fastgrpo.rollout.runtime.threads import on_passing_thread
from fastgrpo.rollout.service.app import build_app
from fastgrpo.rollout.service.config import ServeConfig


def read_prompts(path: str, tokenizer) -> list[list[int]]:
    prompts = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            rec = json.loads(line)
            if "token_ids" in rec:
                prompts.append([int(t) for t in rec["token_ids"]])
            elif "prompt" in rec:
                prompts.append(tokenizer(rec["prompt"])["input_ids"])
            else:
                raise ValueError(f"{path}:{i + 1}: a record needs 'prompt' or 'token_ids'")
        else:
            prompts.append(tokenizer(line)["input_ids"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def train_draft(model_dir: str, prompts_path: str, out: str, cfg: OfflineConfig) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo.rollout.draft_learning.offline import train_offline

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = read_prompts(prompts_path, tok)
    eos = model.config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    head, report = train_offline(model, eos_ids, prompts, cfg)
    head.save(out, meta={"report": report, "model": model_dir})
    print(json.dumps(report), flush=True)
    print(out, flush=True)
    return 0


def run_profile(args) -> int:
    import torch

    from fastgrpo.rollout.runtime.model_runner import ModelRunner, resolve_placement
    from fastgrpo.rollout.runtime.steps import profile_compiled
    from fastgrpo.rollout.speculative.calibration import DEFAULT_SWEEP, Calibration, profile
    from fastgrpo.rollout.speculative.knee import knee, knee_past_sweep
    from fastgrpo.wire.dtypes import dtype_name

    device, dtype = resolve_placement(args.device, args.dtype)
    sweep = [t for t in DEFAULT_SWEEP if t <= args.max_tokens]
    runner = ModelRunner.load(args.model, dtype, device, headroom=max(sweep))
    compiled = profile_compiled(args.compile, runner.device)
    points = profile(runner, sweep, budget_s=args.budget_s, compiled=compiled)
    cal = Calibration(knee(points), str(args.model), str(torch.device(device)), dtype_name(dtype), points,
                      compiled=compiled)
    cal.save(args.out)
    for t, sec in points:
        print(f"{t:5d} tokens  {sec * 1e3:9.2f} ms")
    print(f"C_peak = {cal.c_peak:.1f} tokens per forward ({cal.device}, {cal.dtype}) -> {args.out}", flush=True)
    if knee_past_sweep(points, cal.c_peak):
        print(f"latency never bent within {max(sweep)} tokens: C_peak is at least {cal.c_peak:.0f}; "
              f"profile again with a larger --max-tokens (and --budget-s) to find it", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    """`fastgrpo-rollout` and its commands; serve's flags are ServeConfig's (service/config.py)."""
    top = argparse.ArgumentParser(prog="fastgrpo-rollout", description="fastgrpo rollout service (gRPC)")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="load a model and serve RolloutService over gRPC")
    add_dataclass_args(serve, ServeConfig)
    serve.add_argument("--log-level", default="INFO", help="logging level")
    train = sub.add_parser("train-draft", help="bootstrap a draft head offline on the model's own rollouts of prompts")
    train.add_argument("--model", required=True, help="HF model directory of the target (policy)")
    train.add_argument("--prompts", required=True,
                       help="prompts: a JSONL file whose records have 'prompt' (text) or 'token_ids', or a text file, one prompt per line")
    train.add_argument("--out", required=True, help="directory to write draft.safetensors and draft_config.json to")
    add_dataclass_args(train, OfflineConfig)
    train.add_argument("--log-level", default="INFO", help="logging level")
    prof = sub.add_parser("profile", help="measure C_peak: target forward latency against tokens per forward")
    prof.add_argument("--model", required=True, help="HF model directory of the target")
    prof.add_argument("--out", required=True, help="calibration JSON file (entries keyed by model, device, dtype, compiled)")
    prof.add_argument("--device", default="auto", help="torch device (default: auto)")
    prof.add_argument("--dtype", default="auto", help="weights dtype (default: auto)")
    prof.add_argument("--max-tokens", type=int, default=512, help="largest tokens per forward swept (default: 512)")
    prof.add_argument("--budget-s", type=float, default=120.0, help="stop the sweep after this many seconds (default: 120)")
    prof.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                      help="profile compiled forwards, as `serve --compile` runs them on CUDA (auto: on CUDA); the "
                           "calibration entry is keyed by it too (default: auto)")
    prof.add_argument("--log-level", default="INFO", help="logging level")
    return top


def serve_config(argv: list[str]) -> ServeConfig:
    """The ServeConfig that `fastgrpo-rollout serve ARGV` runs with."""
    return from_args(ServeConfig, parser().parse_args(["serve", *argv]))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "profile":
        return run_profile(args)
    if args.command == "train-draft":
        return train_draft(args.model, args.prompts, args.out, from_args(OfflineConfig, args))
    try:
        cfg = from_args(ServeConfig, args)
        # loaded, profiled and compiled on a thread that ends: the main thread keeps no OpenMP team
        # beside the engine thread's (runtime.threads)
        app = on_passing_thread(lambda: build_app(cfg))
    except (ValueError, OSError) as exc:  # a bad flag or a taken port: say so, without a traceback
        print(f"fastgrpo-rollout serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    # one machine-readable line, so scripts that pass --port 0 learn the port
    print(f"fastgrpo-rollout: serving on {cfg.host}:{app.port}", flush=True)
    if app.http is not None:
        print(f"fastgrpo-rollout: http on {cfg.host}:{app.http.port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):  # timed: a signal the kernel hands to another thread still runs its handler within 1 s
        pass
    app.stop(cfg.limits.shutdown_grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
