"""What the HF engine asks of a model family: :class:`HFAdapter`.

A family (``ling_pretrain/models/<family>/hf.py``) subclasses :class:`HFAdapter` with its
``config.json`` mapping and its tensor table (:mod:`.rules`). The engine (:mod:`.loader`,
:mod:`.exporter`) and the job resolution call only the methods below, so adding a family
changes neither.

Names on the megatron side are *canonical* (layout-free, see :mod:`.naming`):
``embedding.word_embeddings.weight``, ``decoder.layers.{L}.<suffix>`` with the global layer
``L``, ``mtp.layers.{j}.<mtp suffix>`` and ``mtp.layers.{j}.transformer_layer.<suffix>``,
with routed experts numbered globally (``mlp.experts.{E}.``). On the HF side a decoder layer
``L`` lives under :attr:`HFAdapter.layer_prefix` and MTP layer ``j`` under the prefix of layer
:meth:`HFAdapter.mtp_hf_layer` (``num_layers + j``, Ling's and DeepSeek-V3's convention).
"""

from __future__ import annotations

import abc
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ling_pretrain.checkpoint.hf.rules import EXPERT, Mapped, Rule
from ling_pretrain.core.errors import ConfigError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

_HF_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of an HF checkpoint directory.

    Raises:
        FileNotFoundError: ``hf_dir`` has no config.json.
        ConfigError: config.json is not valid JSON.
    """
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{hf_dir} has no {CONFIG_FILE}: give a Hugging Face checkpoint directory "
            "(config.json + *.safetensors), e.g. a download of inclusionAI/Ling-mini-base-2.0."
        )
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); is the download complete?") from None


def hf_params_dtype(hf_config: dict) -> str | None:
    """The checkpoint's parameter dtype as a ``trainer.params_dtype`` name, or None.

    transformers 4.56 and later write it as ``dtype``; older releases (and Ling's published
    configs) as ``torch_dtype``. Both are read, ``dtype`` first.
    """
    for key in ("dtype", "torch_dtype"):
        value = hf_config.get(key)
        if value:
            return _HF_DTYPES.get(str(value).removeprefix("torch."))
    return None


def has_safetensors(hf_dir: str | os.PathLike) -> bool:
    """Whether ``hf_dir`` holds safetensors weights (an index or ``*.safetensors`` files)."""
    path = Path(hf_dir)
    return (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))


def same_value(a: Any, b: Any) -> bool:
    """Config values equal (floats to 1e-9 relative)."""
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


class HFAdapter(abc.ABC):
    """One model family's HF checkpoint format: config.json mapping and tensor table."""

    model_types: tuple[str, ...] = ()
    """``config.json`` ``model_type`` values of this family's checkpoints."""
    layer_prefix: str = "model.layers.{i}."
    """HF name prefix of layer ``i``."""
    model_rules: tuple[Rule, ...] = ()
    """Whole-model tensors (full names on both sides)."""
    layer_rules: tuple[Rule, ...] = ()
    """Tensors of one transformer layer (suffixes on both sides), decoder and MTP alike."""
    mtp_rules: tuple[Rule, ...] = ()
    """Tensors only MTP layers have (suffixes after ``mtp.layers.{j}.`` / the HF layer prefix)."""
    template_patterns: tuple[str, ...] = (
        "tokenizer*",
        "special_tokens_map.json",
        "generation_config.json",
        "*.py",
        "*.tiktoken",
        "merges.txt",
        "vocab.json",
        "chat_template*",
    )
    """Files copied from a template directory into an export (tokenizer, modeling code)."""

    # -- config.json -----------------------------------------------------------------------

    @abc.abstractmethod
    def model_fields(self, hf_config: dict) -> dict[str, Any]:
        """``ModelConfig`` field values described by ``config.json``.

        Raises:
            ConfigError: the checkpoint uses a feature the family's model does not have.
        """

    @abc.abstractmethod
    def check_config(
        self, hf_config: dict, model_cfg: Any, *, init_missing_mtp: bool = False
    ) -> None:
        """Refuse a ``config.json`` that does not describe ``model_cfg``.

        Raises:
            ConfigError: naming every mismatching field and the fix.
        """

    @abc.abstractmethod
    def config_json(self, model_cfg: Any, *, torch_dtype: str = "bfloat16") -> dict:
        """A complete ``config.json`` for ``model_cfg`` (inverse of :meth:`model_fields`)."""

    def mtp_layers(self, hf_config: dict) -> int:
        """MTP layers the checkpoint holds."""
        return 0

    def lacks_mtp(self, hf_config: dict, model_cfg: Any) -> bool:
        """The checkpoint has no MTP layer while the model has (what
        ``checkpoint.hf_init_missing_mtp`` allows)."""
        return not self.mtp_layers(hf_config) and getattr(model_cfg, "mtp_num_layers", 0) > 0

    def fp8_not_converted(self, model_cfg: Any) -> list[str]:
        """Module names an FP8 export keeps in high precision (its ``quantization_config``)."""
        return ["lm_head"]

    def fp8_quantization_config(self, model_cfg: Any, block: tuple[int, int]) -> dict:
        """``quantization_config`` of an FP8 export (DeepSeek-V3's blockwise E4M3 format)."""
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": list(block),
            "activation_scheme": "dynamic",
            "modules_to_not_convert": self.fp8_not_converted(model_cfg),
        }

    def dir_problems(
        self,
        hf_dir: str | os.PathLike,
        model_cfg: Any,
        *,
        init_missing_mtp: bool = False,
        what: str = "checkpoint.init_from_hf",
    ) -> list[str]:
        """Why ``hf_dir`` cannot initialise ``model_cfg`` (empty when it can).

        Cheap: reads config.json and lists the directory, so it runs before any process
        group exists.
        """
        path = Path(hf_dir)
        if not path.is_dir():
            return [f"{what}={hf_dir}: no such directory."]
        try:
            hf = read_hf_config(path)
        except (FileNotFoundError, ConfigError) as err:
            return [f"{what}: {err}"]
        if not has_safetensors(path):
            return [
                f"{what}={hf_dir} holds no *.safetensors weights (only .bin? convert them to "
                "safetensors first)."
            ]
        try:
            self.check_config(hf, model_cfg, init_missing_mtp=init_missing_mtp)
        except ConfigError as err:
            return [f"{what}={hf_dir}: {err}"]
        return []

    # -- tensor table ----------------------------------------------------------------------

    def layer_has(self, rule: Rule, model_cfg: Any, layer: int, mtp: bool) -> bool:
        """Whether HF layer ``layer`` (an MTP layer when ``mtp``) holds ``rule``'s tensors."""
        return True

    def mtp_hf_layer(self, j: int, model_cfg: Any) -> int:
        """The HF layer index of MTP layer ``j``."""
        return model_cfg.num_layers + j

    def num_experts(self, model_cfg: Any) -> int:
        """Routed experts per MoE layer (0 for dense models)."""
        return int(getattr(model_cfg, "num_moe_experts", None) or 0)

    def _layer_keys(self, rules: Iterable[Rule], model_cfg: Any, i: int, mtp: bool) -> list[str]:
        prefix = self.layer_prefix.format(i=i)
        keys = []
        for rule in rules:
            if not self.layer_has(rule, model_cfg, i, mtp):
                continue
            experts = range(self.num_experts(model_cfg)) if rule.expert else [None]
            for e in experts:
                keys += [prefix + h.replace(EXPERT, str(e)) for h in rule.hf]
        return keys

    def expected_keys(self, model_cfg: Any, *, with_mtp: bool = True) -> list[str]:
        """Every tensor name a checkpoint of ``model_cfg`` holds (MTP layers' tensors left
        out when ``with_mtp`` is False)."""
        keys = [k for r in self.model_rules for k in r.hf]
        for i in range(model_cfg.num_layers):
            keys += self._layer_keys(self.layer_rules, model_cfg, i, mtp=False)
        mtp_layers = getattr(model_cfg, "mtp_num_layers", 0) or 0
        for j in range(mtp_layers if with_mtp else 0):
            i = self.mtp_hf_layer(j, model_cfg)
            keys += self._layer_keys(self.mtp_rules, model_cfg, i, mtp=True)
            keys += self._layer_keys(self.layer_rules, model_cfg, i, mtp=True)
        return keys

    def map_canonical(self, canonical: str, model_cfg: Any) -> Mapped:
        """The HF tensors and rule of a canonical megatron name.

        Raises:
            KeyError: the name is not in the table.
        """
        for rule in self.model_rules:
            if rule.mcore == canonical:
                return Mapped(canonical, rule.hf, rule, False)
        m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", canonical)
        if m:
            hf_layer, suffix = int(m.group(1)), m.group(2)
        else:
            m = re.match(r"^mtp\.layers\.(\d+)\.(.*)$", canonical)
            if not m:
                raise KeyError(canonical)
            hf_layer, suffix = self.mtp_hf_layer(int(m.group(1)), model_cfg), m.group(2)
            prefix = self.layer_prefix.format(i=hf_layer)
            for rule in self.mtp_rules:
                if rule.mcore == suffix:
                    return Mapped(canonical, tuple(prefix + h for h in rule.hf), rule, False)
            if not suffix.startswith("transformer_layer."):
                raise KeyError(canonical)
            suffix = suffix[len("transformer_layer.") :]
        rule, expert = self._layer_rule(suffix)
        prefix = self.layer_prefix.format(i=hf_layer)
        keys = tuple(prefix + h.replace(EXPERT, expert or "") for h in rule.hf)
        return Mapped(canonical, keys, rule, expert is not None)

    def _layer_rule(self, suffix: str) -> tuple[Rule, str | None]:
        m = re.match(r"^(.*\.experts\.)(\d+)(\..*)$", suffix)
        if m:
            pattern = f"{m.group(1)}{EXPERT}{m.group(3)}"
            for rule in self.layer_rules:
                if rule.mcore == pattern:
                    return rule, m.group(2)
        for rule in self.layer_rules:
            if rule.mcore == suffix:
                return rule, None
        raise KeyError(suffix)
