"""Which model a checkpoint directory holds: the one function that turns a checkpoint path
into a job config (used by ``launch/evaluate.py`` and ``launch/convert.py``).

* A Hugging Face directory (``config.json`` + safetensors): its ``model_type`` names the model
  family, and its fields set every architecture field of the family's base preset; the
  parameter dtype comes from ``dtype`` (transformers >= 4.56) or ``torch_dtype``.
* A megatron checkpoint (``iter_XXXXXXX`` or its save_dir): the run's own ``config.yaml``
  (in the checkpoint, its save_dir or the run directory above) gives the family, the preset
  and every model field, and the dtype it was trained in.
* ``+model=<preset>`` among the overrides names the model instead; an HF config.json is then
  checked against it.

When neither source can decide, the error says what to pass. Nothing falls back silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ling_pretrain.checkpoint.dist import resolve_checkpoint_dir
from ling_pretrain.checkpoint.hf.adapter import (
    CONFIG_FILE,
    has_safetensors,
    hf_params_dtype,
    read_hf_config,
)
from ling_pretrain.config import CONF_DIR, compose_job, has_model_override
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.models.family import ModelFamily
from ling_pretrain.models.registry import family_for_hf_config, get_family

RUN_CONFIG = "config.yaml"
"""The resolved config a run writes into its output directory (and convert into its out-dir)."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint and the job config that builds its model."""

    kind: str
    """``hf`` or ``megatron``."""
    path: Path
    """The HF directory, or the megatron ``iter_XXXXXXX`` directory."""
    cfg: Any
    """The composed job config."""
    family: ModelFamily
    source: str
    """Where the model came from (for messages)."""


def model_overrides(values: dict) -> list[str]:
    """Hydra overrides setting ``model.<field>`` to each value."""
    return [f"model.{k}={json.dumps(v)}" for k, v in values.items()]


def find_run_config(ckpt: Path) -> Path | None:
    """``config.yaml`` beside a megatron checkpoint: in it, its save_dir or the run dir."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (d / RUN_CONFIG).is_file():
            return d / RUN_CONFIG
    return None


def _is_preset(name: str) -> bool:
    return bool(name) and (CONF_DIR / "model" / f"{name}.yaml").is_file()


def _dtype_override(dtype: str | None) -> list[str]:
    return [f"trainer.params_dtype={dtype}"] if dtype else []


def resolve_checkpoint(
    path: str | Path,
    overrides: Sequence[str] = (),
    base: Sequence[str] = (),
    *,
    params_dtype: str | None = None,
) -> ResolvedCheckpoint:
    """The model and job config of the checkpoint at ``path``. Needs no process group.

    Args:
        path: an HF directory, a megatron ``iter_XXXXXXX`` directory or its save_dir.
        overrides: the user's Hydra overrides (``+model=...`` names the model explicitly).
        base: overrides of the calling command, applied before the model's and the user's.
        params_dtype: the dtype to build the model in; default: the checkpoint's.

    Raises:
        ConfigError: the path is neither kind of checkpoint, its model cannot be told, or an
            HF config.json does not match the model named with ``+model=``.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint {p}: no such file or directory.")
    if (p / CONFIG_FILE).is_file():
        return _resolve_hf(p, overrides, base, params_dtype)
    try:
        ckpt = resolve_checkpoint_dir(str(p))
    except FileNotFoundError as err:
        raise ConfigError(
            f"checkpoint {p} is neither a Hugging Face directory (config.json + safetensors) "
            f"nor a megatron checkpoint: {err}"
        ) from None
    return _resolve_megatron(ckpt, overrides, base, params_dtype)


def _resolve_hf(
    path: Path, overrides: Sequence[str], base: Sequence[str], params_dtype: str | None
) -> ResolvedCheckpoint:
    if not has_safetensors(path):
        raise ConfigError(f"checkpoint {path} has a config.json but no *.safetensors weights.")
    hf = read_hf_config(path)
    dtype = params_dtype or hf_params_dtype(hf) or "bf16"
    if has_model_override(overrides):
        cfg = compose_job([*base, *_dtype_override(dtype), *overrides])
        family, source = get_family(cfg.model), f"+model= ({cfg.model.name})"
    else:
        family = family_for_hf_config(hf, f"{path / CONFIG_FILE}")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name) or "hf"
        derived = model_overrides(family.hf.model_fields(hf))
        cfg = compose_job(
            [
                f"+model={family.default_preset}",
                *base,
                *_dtype_override(dtype),
                f"model.name={name}",
                *derived,
                *overrides,
            ]
        )
        source = f"{path / CONFIG_FILE} ({family.name} family)"
    init_missing_mtp = bool(cfg.checkpoint.hf_init_missing_mtp)
    family.hf.check_config(hf, cfg.model, init_missing_mtp=init_missing_mtp)
    return ResolvedCheckpoint("hf", path, cfg, family, source)


def _resolve_megatron(
    ckpt: Path, overrides: Sequence[str], base: Sequence[str], params_dtype: str | None
) -> ResolvedCheckpoint:
    if has_model_override(overrides):
        cfg = compose_job([*base, *_dtype_override(params_dtype), *overrides])
        return ResolvedCheckpoint(
            "megatron", ckpt, cfg, get_family(cfg.model), f"+model= ({cfg.model.name})"
        )
    saved_path = find_run_config(ckpt)
    if saved_path is None:
        raise ConfigError(
            f"cannot tell which model {ckpt} holds: there is no {RUN_CONFIG} in it, its parent "
            "or the run directory above. Name the model: add +model=<preset> (and the model.* "
            "overrides the run used)."
        )
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(
            f"{saved_path} cannot be read ({err}); name the model with +model=."
        ) from None
    model = dict(saved.get("model") or {})
    if not model:
        raise ConfigError(f"{saved_path} has no model section; name the model with +model=.")
    family = get_family(model.get("family", "ling"))
    preset = model.get("name") if _is_preset(model.get("name", "")) else family.default_preset
    dtype = params_dtype or (saved.get("trainer") or {}).get("params_dtype")
    cfg = compose_job(
        [f"+model={preset}", *base, *_dtype_override(dtype), *model_overrides(model), *overrides]
    )
    return ResolvedCheckpoint("megatron", ckpt, cfg, family, str(saved_path))
