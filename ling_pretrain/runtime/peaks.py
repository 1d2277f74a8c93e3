"""Peak Tensor Core throughput of each GPU, the denominator of MFU.

The figures are NVIDIA's data-sheet numbers **without sparsity**: the data sheets print the
2:4-sparse figure (twice the dense one) with a footnote, and MFU against it halves every
result (Megatron-LM issue 1565). Only dense peaks belong here. A device not in the table
has no MFU (the trainer logs ``mfu`` null and warns once) unless ``logging.peak_tflops``
gives its peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    """Dense Tensor Core peaks of one GPU, TFLOP/s."""

    device: str
    """Short name, e.g. ``H100 SXM``."""
    bf16_tflops: float
    """BF16 dense peak."""
    fp8_tflops: float | None
    """FP8 dense peak; None where the GPU has no FP8 Tensor Cores."""
    source: str
    """Where the figure comes from (the data sheet prints twice it, with sparsity)."""


_H100 = "NVIDIA H100 Tensor Core GPU data sheet, https://www.nvidia.com/en-us/data-center/h100/"
_H200 = "NVIDIA H200 Tensor Core GPU data sheet, https://www.nvidia.com/en-us/data-center/h200/"
_A100 = "NVIDIA A100 Tensor Core GPU data sheet, https://www.nvidia.com/en-us/data-center/a100/"
_B200 = (
    "NVIDIA DGX B200 / HGX B200 data sheet (72 PFLOPS FP8 and 36 PFLOPS BF16 sparse for 8 GPUs),"
    " https://www.nvidia.com/en-us/data-center/dgx-b200/"
)
_GB200 = (
    "NVIDIA GB200 NVL72 data sheet (720 PFLOPS FP8 and 360 PFLOPS BF16 sparse for 72 GPUs), "
    "https://www.nvidia.com/en-us/data-center/gb200-nvl72/"
)

PEAKS: dict[str, Peak] = {
    p.device: p
    for p in (
        Peak("H100 SXM", 989.0, 1979.0, _H100),
        Peak("H100 PCIe", 756.0, 1513.0, _H100),
        Peak("H800 SXM", 989.0, 1979.0, "NVIDIA H800: the H100 SXM's Tensor Cores; " + _H100),
        Peak("H200 SXM", 989.0, 1979.0, _H200),
        Peak("A100", 312.0, None, _A100),
        Peak("A800", 312.0, None, "NVIDIA A800: the A100's Tensor Cores; " + _A100),
        Peak("B200", 2250.0, 4500.0, _B200),
        Peak("GB200", 2500.0, 5000.0, _GB200),
    )
}
"""Dense peaks by device, TFLOP/s per GPU."""

# ``torch.cuda.get_device_name`` strings -> table entries, first match wins. Variants with
# other clocks or power limits (H100/H200 NVL, H800 PCIe, GH200) have no entry on purpose:
# a wrong peak is worse than none.
_NAME_RULES: tuple[tuple[str, str | None], ...] = (
    (r"\bH100\b.*\bNVL\b", None),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bH800\b.*\bPCIe\b", None),
    (r"\bH800\b", "H800 SXM"),
    (r"\bH200\b.*\bNVL\b", None),
    (r"\bH200\b", "H200 SXM"),
    (r"\bA100\b", "A100"),
    (r"\bA800\b", "A800"),
    (r"\bGB200\b", "GB200"),
    (r"\bB200\b", "B200"),
)


def peak_for(device_name: str) -> Peak | None:
    """The table entry of a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    for pattern, key in _NAME_RULES:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return PEAKS[key] if key else None
    return None
