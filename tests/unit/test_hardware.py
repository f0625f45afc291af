"""bigtrain/core/hardware.py and `parallel.precision: auto`: native bf16 from CPU facts (fed by hand), the resolution
rules per device, and matmul peaks (datasheet, measured once and cached, replaced when a run beats them)."""

from __future__ import annotations

import json

import pytest
import torch

from bigtrain.core import hardware
from bigtrain.core.hardware import CpuInfo, cpu_bf16_native, matmul_peak, peak_flops_per_sec, raised_peak
from bigtrain.parallel.precision import resolve_precision

ZEN4 = CpuInfo("x86_64", frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512", None)
SAPPHIRE_RAPIDS = CpuInfo("x86_64", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), "AVX512", None)
SKYLAKE_SP = CpuInfo("x86_64", frozenset({"avx2", "avx512f"}), "AVX512", None)
HASWELL = CpuInfo("x86_64", frozenset({"avx2", "fma"}), "AVX2", None)


@pytest.mark.parametrize("info, native, reason", [
    (ZEN4, True, "this CPU has native bf16 matmul (avx512_bf16)"),
    (SAPPHIRE_RAPIDS, True, "this CPU has native bf16 matmul (amx_bf16)"),
    (SKYLAKE_SP, False, "this CPU has no native bf16 matmul (no amx_bf16 / avx512_bf16 flag)"),
    (HASWELL, False, "this CPU has no native bf16 matmul (torch CPU capability AVX2)"),
    # The flags are there, but torch or oneDNN were told to use AVX2 kernels only (ATEN_CPU_CAPABILITY,
    # ONEDNN_MAX_CPU_ISA): bf16 then runs as slowly as on an AVX2 CPU.
    (CpuInfo("x86_64", ZEN4.flags, "AVX2", None), False, "this CPU has no native bf16 matmul (torch CPU capability AVX2)"),
    (CpuInfo("x86_64", ZEN4.flags, "AVX512", "AVX2"), False,
     "ONEDNN_MAX_CPU_ISA=AVX2 leaves no native bf16 matmul on this CPU"),
    (CpuInfo("x86_64", ZEN4.flags, "AVX512", "avx512_core_amx"), True, "this CPU has native bf16 matmul (avx512_bf16)"),
])
def test_native_bf16_is_decided_from_the_cpu_flags_and_kernel_caps(info, native, reason):
    assert cpu_bf16_native(info, measure_speedup=lambda: pytest.fail("flags decide; nothing is measured")) == (native, reason)


@pytest.mark.parametrize("speedup, native", [(2.4, True), (1.0, True), (0.05, False)])
def test_without_x86_flags_native_bf16_is_measured(speedup, native):
    graviton = CpuInfo("aarch64", frozenset({"fp", "asimd", "sve"}), "SVE256", None)
    got, reason = cpu_bf16_native(graviton, measure_speedup=lambda: speedup)
    assert got is native
    assert reason == f"this CPU has {'native' if native else 'no native'} bf16 matmul (measured {speedup:.2f}× fp32's speed)"


@pytest.mark.parametrize("info, expected", [(ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (SKYLAKE_SP, "fp32"),
                                            (HASWELL, "fp32")])
def test_auto_on_cpu_is_bf16_only_where_bf16_is_native(info, expected):
    resolved = resolve_precision("auto", torch.device("cpu"), cpu=info)
    assert resolved.name == expected and resolved.requested == "auto"
    assert resolved.describe() == f"auto → {expected}: {cpu_bf16_native(info)[1]}"


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "bf16-pure"])
def test_an_explicit_precision_is_kept_whatever_the_hardware(name):
    resolved = resolve_precision(name, torch.device("cpu"), cpu=HASWELL)
    assert (resolved.name, resolved.describe()) == (name, f"{name}: set in the recipe")


def test_auto_takes_the_launchers_choice_over_the_hardware():
    resolved = resolve_precision("auto", torch.device("cpu"), cpu=HASWELL, launcher_choice="bf16")
    assert resolved.describe() == "auto → bf16: the launcher's config asks for it"


@pytest.mark.parametrize("section, expected", [("bf16", "bf16"), ("fp16", "fp16"), (None, "fp32")])
def test_auto_under_deepspeed_takes_the_precision_its_config_file_enables(tmp_path, section, expected):
    from bigtrain.config import ParallelConfig
    from bigtrain.parallel import launcher_precision

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7}, **({section: {"enabled": True}}
                                                                                         if section else {})}))
    parallel = ParallelConfig(strategy="deepspeed", deepspeed_config=str(extra))
    resolved = resolve_precision("auto", torch.device("cpu"), cpu=HASWELL, launcher_choice=launcher_precision(parallel))
    assert resolved.name == expected


@pytest.mark.parametrize("bf16, expected", [(True, "auto → bf16: NVIDIA H100 80GB HBM3 computes in bf16 natively"),
                                            (False, "auto → fp16: Tesla V100-SXM2-16GB has no native bf16: fp16 with "
                                                    "dynamic loss scaling")])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16, expected):
    # No GPU here: the two facts the rule reads stand in for one.
    name = "NVIDIA H100 80GB HBM3" if bf16 else "Tesla V100-SXM2-16GB"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert resolve_precision("auto", torch.device("cuda", 0)).describe() == expected


# -- peaks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.float32, 51e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, 125e12),
        ("NVIDIA L4", torch.float16, 121e12),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165e12),
    ],
)
def test_known_gpus_use_the_datasheet_peak(monkeypatch, tmp_path, device_name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    got = matmul_peak(torch.device("cuda", 0), dtype, cache_dir=tmp_path)
    assert got.flops_per_sec == peak and got.source == f"datasheet ({device_name})"
    assert not (tmp_path / "peak_flops.json").exists()


def test_unknown_gpu_names_are_not_mistaken_for_table_entries():
    assert hardware._datasheet_peak("NVIDIA L40S", torch.bfloat16) is None  # not an L4
    assert hardware._datasheet_peak("NVIDIA A10", torch.bfloat16) is None  # not an A100


def test_cpu_peak_is_measured_once_per_op_path_then_read_from_cache(tmp_path, monkeypatch):
    measured = []

    def fake_measure(device, compute, param):
        measured.append((compute, param))
        return 1.5e11

    monkeypatch.setattr(hardware, "_measure_linear_flops", fake_measure)
    cpu = torch.device("cpu")
    assert peak_flops_per_sec(cpu, torch.float32, cache_dir=tmp_path) == 1.5e11
    assert peak_flops_per_sec(cpu, torch.float32, cache_dir=tmp_path) == 1.5e11
    assert measured == [(torch.float32, torch.float32)]
    peak = matmul_peak(cpu, torch.bfloat16, cache_dir=tmp_path)  # mixed precision: linear under bf16 autocast
    matmul_peak(cpu, torch.bfloat16, torch.bfloat16, cache_dir=tmp_path)  # bf16-pure: a plain bf16 linear
    assert measured == [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    assert peak.source == f"measured (linear under bfloat16 autocast, cached in {tmp_path / 'peak_flops.json'})"

    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert len(cache) == 3
    key = next(k for k in cache if "torch.float32 from torch.float32" in k)
    assert f"threads={torch.get_num_threads()}" in key and torch.__version__ in key
    assert torch.backends.cpu.get_cpu_capability() in key and hardware.PEAK_PATH_VERSION in key


def test_a_peak_cached_by_the_old_torch_mm_measurement_is_not_reused(tmp_path, monkeypatch):
    # Before, the cache held plain torch.mm peaks under "<cpu> | threads=N | torch.bfloat16 | torch X": on an
    # AVX2 CPU that figure was below what the autocast path reaches, and MFU read 190%.
    old_key = f"{hardware._cpu_model()} | threads={torch.get_num_threads()} | torch.bfloat16 | torch {torch.__version__}"
    (tmp_path / "peak_flops.json").write_text(json.dumps({old_key: 1.34e9}))
    monkeypatch.setattr(hardware, "_measure_linear_flops", lambda device, compute, param: 4.2e10)
    assert peak_flops_per_sec(torch.device("cpu"), torch.bfloat16, cache_dir=tmp_path) == 4.2e10


def test_a_peak_beaten_by_a_run_is_measured_again_and_replaced(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    key = hardware._cache_key(cpu, torch.float32, torch.float32)
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: 1e3}))  # a wrong figure, as a stale cache may hold
    wrong = matmul_peak(cpu, torch.float32, cache_dir=tmp_path)
    assert wrong.flops_per_sec == 1e3

    better = raised_peak(wrong, 5e3, cpu, torch.float32, cache_dir=tmp_path)
    assert better.flops_per_sec > 1e8  # really measured again (a toy CPU does more than 0.1 GFLOP/s)
    assert json.loads((tmp_path / "peak_flops.json").read_text())[key] == better.flops_per_sec
    # Never below what the run achieved: MFU stays ≤ 1 even when the new measurement is unlucky (a busy machine).
    monkeypatch.setattr(hardware, "_measure_linear_flops", lambda device, compute, param: 2e3)
    assert raised_peak(better, 1e16, cpu, torch.float32, cache_dir=tmp_path).flops_per_sec == 1e16


def test_measured_cpu_linear_peak_is_plausible():
    flops = hardware._measure_linear_flops(torch.device("cpu"), torch.float32, torch.float32, budget_s=0.2)
    assert 1e8 < flops < 1e14  # between a toy and a whole server rack
