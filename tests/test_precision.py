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
