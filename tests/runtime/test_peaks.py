"""The peak table: dense figures only, and CUDA device names mapped to the right entry."""

from __future__ import annotations

import pytest

from ling_pretrain.runtime.peaks import PEAKS, peak_for


@pytest.mark.parametrize(
    "name, device",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H800", "H800 SXM"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA A800-SXM4-80GB", "A800"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GB200", "GB200"),
        # Other clocks and power limits: no entry rather than a wrong one.
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA H800 PCIe", None),
        ("NVIDIA L40S", None),
    ],
)
def test_device_names(name, device):
    peak = peak_for(name)
    assert (peak.device if peak else None) == device


def test_peaks_are_dense_not_sparse():
    # The data sheets print 1979 (BF16) and 3958 (FP8) for the H100 SXM, with sparsity.
    assert PEAKS["H100 SXM"].bf16_tflops == 989 and PEAKS["H100 SXM"].fp8_tflops == 1979
    assert PEAKS["A100"].bf16_tflops == 312 and PEAKS["A100"].fp8_tflops is None
    for peak in PEAKS.values():
        assert peak.source
        if peak.fp8_tflops is not None:
            assert abs(peak.fp8_tflops - 2 * peak.bf16_tflops) <= 1, peak.device
