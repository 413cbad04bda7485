"""utils/precision.py's record of the machine: a CPU's model name with the widest units its matmuls run on."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils import precision
from utils.precision import device_name

CPUINFO_SECTION = """processor\t: {n}
model name\t: {model}
flags\t\t: fpu sse sse2 {flags}
"""


@pytest.mark.parametrize("flags, units", [("avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", "AMX"),
                                          ("avx2 avx512f avx512_bf16", "AVX512-BF16"),
                                          ("avx2 avx512f", "AVX512"), ("avx2 fma", "AVX2")])
def test_device_name_names_the_cpu_and_its_widest_matmul_units(flags: str, units: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(CPUINFO_SECTION.format(n=n, model="AMD EPYC 9R14", flags=flags) for n in range(2)))
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert device_name("cpu") == f"AMD EPYC 9R14 ({units})"


def test_device_name_without_cpuinfo_still_names_something(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert device_name("cpu")


@pytest.mark.parametrize("flags, onednn, fast", [
    ({"avx2", "avx512f", "avx512_bf16"}, True, True), ({"avx2", "avx512f", "amx_bf16"}, True, True),
    ({"avx2", "avx512f", "avx512bw"}, True, False),  # oneDNN emulates bf16 on plain AVX-512: 3.6x slower than fp32
    ({"avx2", "fma"}, False, False), (None, True, True), (None, False, False)])
def test_bf16_autocast_needs_bf16_units_where_the_cpu_lists_its_flags(flags: set[str] | None, onednn: bool,
                                                                      fast: bool) -> None:
    assert precision.cpu_has_bf16_units(flags, onednn) is fast


def test_cpu_flags_read_the_first_cpu_and_none_without_x86_flags(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_SECTION.format(n=0, model="Intel(R) Xeon(R) Processor", flags="avx2 avx512f"))
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.cpu_flags() == {"fpu", "sse", "sse2", "avx2", "avx512f"}
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # an ARM CPU lists Features, not flags
    assert precision.cpu_flags() is None
