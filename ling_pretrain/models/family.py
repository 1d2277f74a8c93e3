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
from ling_pretrain.models.flops import FlopsPerToken, gpt_flops_per_token


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

    def flops(self, model_cfg: Any, seq_length: int) -> FlopsPerToken:
        """Training FLOPs per token by term, in Megatron-LM's convention
        (:mod:`ling_pretrain.models.flops`), from the family's ``TransformerConfig`` fields and
        :meth:`moe_layer_pattern`. A family whose layers are not megatron-core's GPT layers
        overrides it."""
        vocab = self.gpt_model_kwargs(model_cfg)["vocab_size"]
        return gpt_flops_per_token(
            self.transformer_kwargs(model_cfg), vocab, seq_length, self.moe_layer_pattern(model_cfg)
        )

    def flops_per_token(self, model_cfg: Any, seq_length: int) -> float:
        """Training FLOPs (forward + backward) per token at ``seq_length``."""
        return self.flops(model_cfg, seq_length).total

    @abc.abstractmethod
    def check(self, cfg: Any, errors: list[str]) -> None:
        """Append every reason ``cfg.model`` is not a valid model of this family."""
