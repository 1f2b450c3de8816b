"""Which int8 weight layout the CPU flavour takes on which CPU."""

from __future__ import annotations

import pytest

from exporters import cpu_kernels


@pytest.mark.parametrize(
    ("machine", "flags", "exact"),
    [
        ("x86_64", {"avx2", "fma"}, False),  # Zen 3, Haswell..Comet Lake: vpmaddubsw saturates
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, True),  # Zen 4, Cascade Lake and later
        ("x86_64", {"avx2", "avx_vnni"}, True),  # Alder Lake
        ("aarch64", {"asimd", "asimddp"}, True),
    ],
)
def test_u8s8_exactness_follows_the_cpu_features(monkeypatch, machine, flags, exact):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: machine)
    assert cpu_kernels.u8s8_products_exact() is exact
    assert cpu_kernels.cpu_int8_weight_type("auto") == ("int8" if exact else "uint8")
    assert cpu_kernels.cpu_int8_weight_type("uint8") == "uint8"  # an explicit choice is kept


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="auto, int8 or uint8"):
        cpu_kernels.cpu_int8_weight_type("int4")


def test_the_machine_description_names_its_simd_features(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "sse4_2"}))
    assert cpu_kernels.cpu_features() == "avx2+avx512f"
    assert "avx2+avx512f" in cpu_kernels.machine_description()
