"""Where the computation runs: device, numeric precision, the processes of a data-parallel run,
and what memory it used. Shared by fine-tuning, generation and evaluation.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import resource
import shutil
import subprocess
import sys
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.distributed

PRECISIONS = ("auto", "fp32", "bf16-true", "bf16-mixed")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


class DeviceError(ValueError):
    """A run that cannot go ahead as asked on this machine."""


class Dist(NamedTuple):
    """This process's place in a data-parallel run; rank 0 of 1 when not started by torchrun."""

    rank: int
    world_size: int
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 weights where the GPU computes in bf16 natively (compute capability 8.0 and
    later), float32 elsewhere. Adapters are float32 always; bf16-mixed keeps float32 weights and
    runs the forward pass under bf16 autocast."""
    bf16_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if name == "auto":
        return "bf16-true" if bf16_gpu else "fp32"
    if name.startswith("bf16") and device.type == "cuda" and not bf16_gpu:
        raise DeviceError(f"{torch.cuda.get_device_name(device)} has no native bf16; use --precision fp32")
    return name


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of handing it back to the system.

    Every step frees and allocates again the same large activations (the logits alone are
    tokens x vocabulary x 4 bytes). glibc maps any block over 32 MiB on demand and unmaps it when
    freed, so each step pays page faults to map and zero them afresh: a quarter of the step time
    of a small model with LLaMA's vocabulary (bench/trainer_cpu.py). The price is a higher peak
    RSS where freed blocks do not fit later requests. On GPUs, PyTorch's caching allocator
    already reuses memory this way."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def environment(device: torch.device) -> dict:
    """What this process computes with, as the run manifest records it: library versions, and
    the GPU, its driver and CUDA where there is one (the driver as nvidia-smi reports it)."""
    import sentencepiece

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentencepiece": sentencepiece.__version__,
        "device": device.type,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
        found["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        found["gpu_count"] = torch.cuda.device_count()
        found["driver"] = _nvidia_driver()
    return found


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        answer = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return answer.stdout.splitlines()[0].strip() if answer.stdout.strip() else None


def device_arg(name: str) -> torch.device:
    """argparse type for --device: auto, cpu, cuda or cuda:N, CUDA only where there is one."""
    try:
        device = resolve_device(name)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name}: no CUDA device is available")
    return device


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK):
    NCCL between GPUs, one per process, Gloo between CPU processes."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world_size, device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors on a GPU, peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
