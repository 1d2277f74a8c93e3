"""Lazy, streaming access to the tensors of an HF safetensors checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ling_pretrain.checkpoint.hf.adapter import CONFIG_FILE, INDEX_FILE
from ling_pretrain.fp8.quantize import dequantize_blockwise

FP8_BLOCK = (128, 128)
"""Weight block of DeepSeek-V3-style FP8 checkpoints unless ``quantization_config`` says."""

SCALE_INV_SUFFIX = "_scale_inv"
"""Suffix of the per-block inverse scales of an FP8 weight: ``<name>.weight_scale_inv``."""


def _fp8_weight_block(hf_dir: Path) -> tuple[int, int]:
    """The block shape of an FP8 checkpoint's ``weight_scale_inv`` tensors (128x128 default)."""
    path = hf_dir / CONFIG_FILE
    quant = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if not quant:
        return FP8_BLOCK
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(
            f"{hf_dir}: quantization_config {quant} is not a blockwise E4M3 FP8 checkpoint; "
            "only bf16/fp32 checkpoints and DeepSeek-V3-style FP8 ones (quant_method fp8, "
            "fmt e4m3, weight_block_size) can be loaded."
        )
    block = quant.get("weight_block_size") or list(FP8_BLOCK)
    return int(block[0]), int(block[1])


class HFReader:
    """Lazy access to the tensors of an HF checkpoint (single file or sharded with an index).

    Files are opened with ``safetensors.safe_open`` when first needed; ``get`` reads one
    tensor, or one row/column range of it, without loading anything else.

    FP8 checkpoints (DeepSeek-V3 style, as :func:`export_hf` writes with ``dtype="fp8"``)
    are read as the fp32 values they stand for: a weight stored with a ``weight_scale_inv``
    companion is dequantised block by block (``weight_block_size`` from config.json's
    ``quantization_config``, 128x128 by default) and the scale tensors are not listed in
    :meth:`keys`.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            with open(index) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.dir} holds no *.safetensors files (and no {INDEX_FILE}); give a "
                    "Hugging Face checkpoint directory."
                )
            from safetensors import safe_open

            self.weight_map = {}
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        self.weight_map[key] = path.name
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{self.dir}/{INDEX_FILE} names files that are not there: {', '.join(missing[:5])}"
            )
        self._handles: dict[str, Any] = {}
        self.block = _fp8_weight_block(self.dir)

    def keys(self) -> list[str]:
        return [k for k in self.weight_map if not k.endswith(".weight" + SCALE_INV_SUFFIX)]

    def _scale_key(self, key: str) -> str | None:
        scale = key + SCALE_INV_SUFFIX
        return scale if key.endswith(".weight") and scale in self.weight_map else None

    def _file(self, key: str) -> Any:
        from safetensors import safe_open

        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.dir / name), framework="pt")
        return self._handles[name]

    def shape(self, key: str) -> list[int]:
        return list(self._file(key).get_slice(key).get_shape())

    def get(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """One tensor, or a row range / column range of a 2-D tensor."""
        scale_key = self._scale_key(key)
        if scale_key is not None:
            q = self._file(key).get_tensor(key)
            scale_inv = self._file(scale_key).get_tensor(scale_key)
            full = dequantize_blockwise(q, scale_inv, self.block)
            return full[rows or slice(None), cols or slice(None)]
        if rows is None and cols is None:
            return self._file(key).get_tensor(key)
        part = self._file(key).get_slice(key)
        if cols is None:
            return part[rows]
        return part[rows or slice(None), cols]

    def close(self) -> None:
        self._handles.clear()
