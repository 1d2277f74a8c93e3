"""What a model family provides: :class:`ModelFamily`.

A family is a folder ``ling_pretrain/models/<family>/`` whose package defines ``FAMILY``, an
instance of a :class:`ModelFamily` subclass, plus presets in ``conf/model/`` that set
``family: <name>``. The registry (:mod:`.registry`) finds it; the trainer, the checkpoint
code and the HF engine only call the methods below.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any

from ling_pretrain.checkpoint.hf.adapter import HFAdapter


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Parameter counts of one configuration (numbers of scalars, not bytes)."""

    total_params: int
    """Every parameter of the main model (embedding, decoder, final norm, lm_head); no MTP."""
    active_params: int
    """Parameters one token uses in a forward pass: top-k routed experts only."""
    mtp_params: int
    """The MTP layers' own parameters (they share the embedding and lm_head)."""
    mtp_active_params: int
    """MTP parameters one token uses."""
    embedding_params: int
    """Input embedding plus lm_head."""
    expert_params: int
    """Routed-expert weights in the main model (the part expert parallelism splits)."""
    mtp_expert_params: int
    """Routed-expert weights in the MTP layers."""
    buffers: int
    """fp32 expert-bias entries (main model and MTP)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ModelFamily(abc.ABC):
    """One architecture family on megatron-core's GPT model."""

    name: str
    """The ``model.family`` value of its presets."""
    default_preset: str
    """The ``conf/model/`` preset a model of this family is composed from when a checkpoint's
    config.json describes it (every architecture field is then set from config.json)."""
    hf: HFAdapter
    """Its Hugging Face checkpoint format."""

    @abc.abstractmethod
    def transformer_kwargs(self, model_cfg: Any) -> dict[str, Any]:
        """The architecture's part of megatron-core's ``TransformerConfig`` (layers, widths,
        attention, MLP, MoE, MTP); parallelism, precision and kernels are added by
        :mod:`ling_pretrain.models.mcore`."""

    @abc.abstractmethod
    def gpt_model_kwargs(self, model_cfg: Any) -> dict[str, Any]:
        """Keyword arguments of megatron-core's ``GPTModel`` (vocabulary, positions, RoPE,
        embedding tying) besides config, specs and pipeline flags."""

    def moe_layer_pattern(self, model_cfg: Any) -> list[int]:
        """Per decoder layer, 1 for an MoE layer and 0 for a dense one."""
        return [0] * model_cfg.num_layers

    @abc.abstractmethod
    def count_parameters(self, model_cfg: Any) -> ParamCounts:
        """Closed-form parameter counts."""

    @abc.abstractmethod
    def check(self, cfg: Any, errors: list[str]) -> None:
        """Append every reason ``cfg.model`` is not a valid model of this family."""
