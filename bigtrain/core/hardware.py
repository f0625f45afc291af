"""What this machine can do: CPU features, native bf16 matmul, and the dense matmul peak MFU divides by.

- ``probe_cpu()`` reads the facts once (``/proc/cpuinfo`` flags, torch's CPU capability, a oneDNN ISA
  cap); ``cpu_bf16_native(info)`` decides from them whether bf16 matmuls are native here. On an
  AVX2-only CPU a bf16 matmul is ~50× slower than fp32, so `parallel.precision: auto` must know.
- ``matmul_peak(device, compute, param)``: known CUDA GPUs from a datasheet table; CPUs and unknown GPUs
  measured once with the op path training uses (a linear layer, under autocast when the compute dtype
  differs from the parameters'), best of several repeats, and cached in ``peak_flops.json``.
  ``raised_peak`` replaces a peak that a real run beat: MFU above 1 is never true.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bigtrain.core.fsio import write_atomic

PEAK_CACHE_FILE = "peak_flops.json"
PEAK_PATH_VERSION = "linear-v2"  # in the cache key: peaks measured another way (plain torch.mm) are not reused

# x86 CPU flags that mean bf16 dot products in hardware (oneDNN's bf16 kernels use them).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# torch CPU capabilities (ATEN_CPU_CAPABILITY) below AVX-512: no native bf16 whatever the flags say.
_PRE_AVX512 = ("DEFAULT", "NO AVX", "AVX", "AVX2")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow its bf16 kernels.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                     "ALL", "DEFAULT")


@dataclass(frozen=True)
class CpuInfo:
    """The facts `cpu_bf16_native` decides from (a test can build one by hand)."""

    machine: str                    # platform.machine(): x86_64, aarch64, arm64, ...
    flags: frozenset[str] | None    # /proc/cpuinfo "flags" (x86) or "Features" (ARM); None where unknown
    capability: str                 # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    onednn_max_isa: str | None      # $ONEDNN_MAX_CPU_ISA: a cap on the kernels oneDNN may use


def probe_cpu() -> CpuInfo:
    flags = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags = frozenset(value.split())
                break
    return CpuInfo(machine=platform.machine().lower(), flags=flags,
                   capability=torch.backends.cpu.get_cpu_capability(),
                   onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None)


def cpu_bf16_native(info: CpuInfo, measure_speedup=None) -> tuple[bool, str]:
    """(native, reason): whether bf16 matmuls run natively on this CPU, and why we think so.

    x86 with known flags decides from them (and from any cap on the kernels torch and oneDNN may use);
    elsewhere (ARM, macOS, no /proc) it is measured: `measure_speedup()` returns bf16 / fp32 matmul
    throughput (default: the cached peaks of both on this CPU), and bf16 counts as native when it is not
    slower."""
    x86 = info.machine in ("x86_64", "amd64", "i686", "x86")
    if x86 and info.capability.upper() in _PRE_AVX512:
        return False, f"this CPU has no native bf16 matmul (torch CPU capability {info.capability})"
    if x86 and info.onednn_max_isa and info.onednn_max_isa.upper() not in _ONEDNN_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={info.onednn_max_isa} leaves no native bf16 matmul on this CPU"
    if x86 and info.flags is not None:
        found = [f for f in BF16_FLAGS if f in info.flags]
        if found:
            return True, f"this CPU has native bf16 matmul ({found[0]})"
        return False, f"this CPU has no native bf16 matmul (no {' / '.join(BF16_FLAGS)} flag)"
    if measure_speedup is None:
        cpu = torch.device("cpu")
        measure_speedup = lambda: (matmul_peak(cpu, torch.bfloat16).flops_per_sec  # noqa: E731
                                   / matmul_peak(cpu, torch.float32).flops_per_sec)
    speedup = measure_speedup()
    verdict = "native" if speedup >= 1.0 else "no native"
    return speedup >= 1.0, f"this CPU has {verdict} bf16 matmul (measured {speedup:.2f}× fp32's speed)"


# --------------------------------------------------------------------------- peaks


@dataclass(frozen=True)
class Peak:
    flops_per_sec: float  # dense matmul FLOP/s of one device
    source: str           # "datasheet (NVIDIA H100 80GB HBM3)" or "measured (...)"

    def describe(self) -> str:
        return f"peak {self.flops_per_sec / 1e9:,.0f} GFLOP/s per device, {self.source}"


def matmul_peak(device: torch.device, compute: torch.dtype, param: torch.dtype = torch.float32, *,
                cache_dir: Path | None = None) -> Peak:
    """Dense matmul peak of `device` computing in `compute` with parameters kept in `param`: the denominator of MFU.

    Known CUDA GPUs come from a table of datasheet dense (non-sparse) tensor-core peaks; float32 uses the
    plain FP32 figure (TF32 off). CPUs and unknown GPUs are measured once (`_measure_linear_flops`) and
    cached in `cache_dir/peak_flops.json` (default ~/.cache/bigtrain), keyed by everything that changes the
    figure: device model, threads, kernel caps, dtypes, op path and torch version."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = _datasheet_peak(name, compute)
        if flops is not None:
            return Peak(flops, f"datasheet ({name})")
    key = _cache_key(device, compute, param)
    cache_file = (cache_dir if cache_dir is not None else default_cache_dir()) / PEAK_CACHE_FILE
    cache = _read_json(cache_file)
    if not isinstance(cache.get(key), (int, float)) or cache[key] <= 0:
        cache[key] = _measure_linear_flops(device, compute, param)
        _write_json_atomic(cache_file, cache)
    return Peak(float(cache[key]), f"measured ({_path_name(compute, param)}, cached in {cache_file})")


def raised_peak(peak: Peak, achieved_flops_per_sec: float, device: torch.device, compute: torch.dtype,
                param: torch.dtype = torch.float32, *, cache_dir: Path | None = None) -> Peak:
    """A run achieved more than `peak`, so the peak was wrong: measure again and keep the larger of the new
    figure and the achieved rate (cached, replacing the old one). A datasheet peak is not re-measured."""
    device = torch.device(device)
    if peak.source.startswith("datasheet"):
        return Peak(achieved_flops_per_sec, f"achieved by this run, above the {peak.source}")
    flops = max(_measure_linear_flops(device, compute, param), achieved_flops_per_sec)
    cache_file = (cache_dir if cache_dir is not None else default_cache_dir()) / PEAK_CACHE_FILE
    cache = _read_json(cache_file)
    cache[_cache_key(device, compute, param)] = flops
    _write_json_atomic(cache_file, cache)
    return Peak(flops, f"re-measured after a run beat {peak.flops_per_sec / 1e9:,.0f} GFLOP/s "
                       f"({_path_name(compute, param)}, cached in {cache_file})")


def peak_flops_per_sec(device: torch.device, dtype: torch.dtype, *, cache_dir: Path | None = None) -> float:
    """The matmul peak in FLOP/s for compute in `dtype` over fp32 parameters (mixed precision's path)."""
    return matmul_peak(device, dtype, cache_dir=cache_dir).flops_per_sec


def _path_name(compute: torch.dtype, param: torch.dtype) -> str:
    c = str(compute).removeprefix("torch.")
    return f"linear under {c} autocast" if compute != param else f"{c} linear"


def _cache_key(device: torch.device, compute: torch.dtype, param: torch.dtype) -> str:
    if device.type == "cpu":
        caps = f"{torch.backends.cpu.get_cpu_capability()}, oneDNN {os.environ.get('ONEDNN_MAX_CPU_ISA', 'any')}"
        name = f"{_cpu_model()} ({caps}) | threads={torch.get_num_threads()}"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    return f"{name} | {compute} from {param} | {PEAK_PATH_VERSION} | torch {torch.__version__}"


# (name pattern, bf16/fp16 dense peak, fp32 peak with TF32 off) in FLOP/s; first match wins.
# V100 has no bf16, so its fp16 figure stands for both half types.
_GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100", 989e12, 67e12),  # SXM
    ("H200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("A10G", 125e12, 31.2e12),
    ("L4", 121e12, 30.3e12),
    ("V100", 125e12, 15.7e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
)


def _datasheet_peak(device_name: str, dtype: torch.dtype) -> float | None:
    for pattern, half_peak, fp32_peak in _GPU_PEAKS:
        # whole words only: "L4" must not match "L40S", nor "H100" match "GH100"
        if re.search(rf"(?<!\w){re.escape(pattern)}(?!\w)", device_name):
            if dtype in (torch.bfloat16, torch.float16):
                return half_peak
            if dtype == torch.float32:
                return fp32_peak
            return None
    return None


def _measure_linear_flops(device: torch.device, compute: torch.dtype, param: torch.dtype = torch.float32, *,
                          budget_s: float = 0.3) -> float:
    """Best FLOP/s of a square linear layer (n tokens × n → n) over a few sizes, best of three timings each
    (~budget_s per timing), run the way training runs it: parameters and inputs in `param`, under autocast
    to `compute` when the two differ. Several sizes because the fastest one varies by machine and dtype, the
    best of repeats because a shared machine is noisy; a size whose single product takes longer than
    budget_s (bf16 on an AVX2 CPU) ends the search."""
    sizes = (256, 512, 1024, 2048) if device.type == "cpu" else (2048, 4096, 8192)
    mixed = compute != param

    def seconds_per_linear(x: torch.Tensor, w: torch.Tensor, iters: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=compute) if mixed else contextlib.nullcontext():
            for _ in range(iters):
                F.linear(x, w)
        _synchronize(device)
        return (time.perf_counter() - start) / iters

    best = 0.0
    with torch.inference_mode():
        for n in sizes:
            x = torch.randn(n, n, device=device).to(param)
            w = torch.randn(n, n, device=device).to(param)
            seconds_per_linear(x, w, 1)  # warm up
            per_linear_s = seconds_per_linear(x, w, 1)
            if per_linear_s > budget_s and best > 0:
                break
            iters = max(1, round(budget_s / per_linear_s))
            best = max(best, 2 * n**3 / min(seconds_per_linear(x, w, iters) for _ in range(3)))
    return best


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bigtrain"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    """Best effort: a cache that cannot be written only costs a re-measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass
