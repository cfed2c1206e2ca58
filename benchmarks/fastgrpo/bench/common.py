"""What every benchmark shares: the target it times (on the GPU when there is one), and what it
writes: machine, commit, records, and a plot beside the JSON."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fastgrpo.common.host import cpu_model


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_target(path: str | Path):
    """The fixture's causal LM in eval mode: on the GPU in bfloat16 when one is visible (what a
    rollout server serves), else on the CPU in float32."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def placement(model: torch.nn.Module) -> dict:
    """Where a loaded model runs, as a results file records it: {"device": "cuda", "dtype": "bfloat16"}."""
    param = next(model.parameters())
    return {"device": param.device.type, "dtype": str(param.dtype).removeprefix("torch.")}


def read_bandwidth(nbytes: int, repeats: int, device: torch.device) -> dict:
    """Bytes read per second by a sum over a buffer of nbytes (a streaming reduction on every
    thread, each byte read once, nothing written back): what a decode step at B = 1 does to its
    weights, so weight bytes / this is that step's floor. A copy moves every byte twice (read and
    write): its bytes per second are about half of this (copy_bandwidth: 13 vs 25 GB/s on the
    2-core Xeon here), and a floor from it sat below what HF `generate` reached. The fastest of
    `repeats` counts."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # (N,)
    return _bandwidth(nbytes, repeats, device, src.sum)


def _bandwidth(nbytes: int, repeats: int, device: torch.device, fn) -> dict:
    fn()  # first touch, and the kernel's first launch
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return {"bytes": nbytes, "seconds_runs": seconds, "bytes_per_s": nbytes / min(seconds),
            "bytes_per_s_median": nbytes / statistics.median(seconds)}


def copy_bandwidth(nbytes: int, repeats: int, device: torch.device) -> dict:
    """Bytes copied per second by `dst.copy_(src)` over a buffer of nbytes (each byte read once and
    written once); the fastest of `repeats` copies counts, as for any ceiling (noise only slows)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # (N,)
    dst = torch.empty_like(src)  # (N,)
    return _bandwidth(nbytes, repeats, device, lambda: dst.copy_(src))


def vm_bytes(pid: int | str, field: str) -> int:
    """A /proc/<pid>/status field in bytes (VmHWM: peak resident set, VmRSS: resident set now);
    pid "self" for this process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def commit() -> str:
    """HEAD (with -dirty for uncommitted changes to tracked files other than benchmarks/results/,
    which a run writes as it goes); FASTGRPO_COMMIT where the tree came without its .git (a device
    machine gets a copy of the working tree)."""
    if os.environ.get("FASTGRPO_COMMIT"):
        return os.environ["FASTGRPO_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (runs carry "tokens" and "seconds")."""
    return sorted(runs, key=lambda r: r["tokens"] / r["seconds"])[len(runs) // 2]


def write_results(path: str | Path, suite: str, records: list[dict], **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"suite": suite, "machine": machine(), "commit": commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **extra, "records": records}
    path.write_text(json.dumps(doc, indent=1))
    return path


def plot(path: str | Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
         logx: bool = True, hline: float | None = 1.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=0.8)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
