"""The one private torch name hpsearch uses: torch.cpu's bf16 capability checks (train.py).

torch has no public "does this CPU multiply bf16 in hardware" call, so `cpu_has_native_bf16` asks
`torch.cpu._is_avx512_bf16_supported` / `_is_amx_tile_supported`. If a torch release renames
them, bf16 would silently switch off (a slower search, no error): this test fails instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpsearch.train import cpu_has_native_bf16


@pytest.mark.fast
def test_torch_still_has_the_bf16_capability_checks():
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        assert callable(getattr(torch.cpu, name, None)), f"torch.cpu.{name} is gone: update train.cpu_has_native_bf16"


@pytest.mark.fast
def test_native_bf16_agrees_with_the_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert flags, "no CPU flags in /proc/cpuinfo"
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)
