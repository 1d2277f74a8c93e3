"""An HF checkpoint without MTP into a model with MTP (``checkpoint.hf_init_missing_mtp``).

The checkpoint is exported from ling_tiny with ``model.mtp_num_layers=0``; loaded into
ling_tiny (one MTP layer) every non-MTP tensor equals the source and the MTP layer equals a
fresh initialisation from the same seed. Without the option the mismatch is refused, naming
the option.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ling_pretrain.checkpoint.hf.adapter import read_hf_config
from ling_pretrain.checkpoint.hf.exporter import export_hf
from ling_pretrain.checkpoint.hf.loader import load_hf_into_model
from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.models.registry import get_family
from tests.checkpoint.conftest import TINY_MODEL, randomize, read_all, run_convert, world_of_one
from tests.conftest import TINY, read_metrics, run_pretrain

LING = get_family("ling").hf

SEED = 1234


@pytest.fixture(scope="module")
def hf_no_mtp(tmp_path_factory) -> Path:
    """fp32 HF checkpoint of ling_tiny without MTP, random weights and expert bias."""
    from ling_pretrain.models.build import build_model

    out = tmp_path_factory.mktemp("hf") / "tiny_no_mtp"
    with world_of_one():
        cfg = compose([*TINY_MODEL, "model.mtp_num_layers=0"])
        chunks = build_model(cfg)
        randomize(chunks, 7)
        export_hf(chunks, cfg, LING, out, dtype="fp32")
    return out


def _fresh(cfg) -> list:
    from ling_pretrain.models.build import build_model
    from ling_pretrain.runtime.distributed import seed_everything

    seed_everything(SEED)
    return build_model(cfg)


def test_missing_mtp_refused_naming_the_option(hf_no_mtp):
    cfg = compose(TINY_MODEL)
    assert cfg.model.mtp_num_layers == 1 and not cfg.checkpoint.hf_init_missing_mtp
    config = read_hf_config(hf_no_mtp)
    assert config["num_nextn_predict_layers"] == 0
    with pytest.raises(ConfigError) as info:
        LING.check_config(config, cfg.model)
    message = str(info.value)
    assert "num_nextn_predict_layers=0" in message and "model.mtp_num_layers=1" in message
    assert "checkpoint.hf_init_missing_mtp=true" in message and "--init-missing-mtp" in message
    LING.check_config(config, cfg.model, init_missing_mtp=True)
    problems = LING.dir_problems(hf_no_mtp, cfg.model)
    assert len(problems) == 1 and "hf_init_missing_mtp" in problems[0]
    assert LING.dir_problems(hf_no_mtp, cfg.model, init_missing_mtp=True) == []
    # The option is about a checkpoint *without* MTP: other mismatches stay refused.
    two = compose([*TINY_MODEL, "model.hidden_size=256"])
    with pytest.raises(ConfigError, match="hidden_size=128 but model.hidden_size=256"):
        LING.check_config(config, two.model, init_missing_mtp=True)


def test_load_keeps_fresh_mtp_and_every_other_tensor(hf_no_mtp):
    source = read_all(hf_no_mtp)
    cfg = compose([*TINY_MODEL, "checkpoint.hf_init_missing_mtp=true"])
    with world_of_one():
        with pytest.raises(ConfigError, match="hf_init_missing_mtp"):
            load_hf_into_model(hf_no_mtp, _fresh(cfg), cfg, LING, init_missing_mtp=False)
        loaded, fresh = _fresh(cfg), _fresh(cfg)
        before = {k: v.clone() for k, v in loaded[0].state_dict().items() if v is not None}
        load_hf_into_model(hf_no_mtp, loaded, cfg, LING)
        after, init = loaded[0].state_dict(), fresh[0].state_dict()
        names = [k for k in after if after[k] is not None and not k.endswith("_extra_state")]
        mtp = [k for k in names if k.startswith("mtp.")]
        assert len(mtp) == 30  # enorm, hnorm, eh_proj, final_layernorm + an MoE layer
        for k in mtp:
            assert torch.equal(after[k], init[k]), k  # the fresh init, same seed
        norms = [k for k in mtp if k.rsplit(".", 2)[-2] in ("enorm", "hnorm", "final_layernorm")]
        assert len(norms) == 3 and all(bool((after[k] == 1).all()) for k in norms)
        assert after["mtp.layers.0.eh_proj.weight"].std() > 0

        # Every other tensor equals the model the checkpoint was exported from.
        from ling_pretrain.models.build import build_model

        no_mtp = compose([*TINY_MODEL, "model.mtp_num_layers=0"])
        original = build_model(no_mtp)
        randomize(original, 7)
        want = {k: v for k, v in original[0].state_dict().items() if v is not None}
        others = [k for k in names if not k.startswith("mtp.")]
        assert len(others) == 89 and set(others) == {k for k in want if "_extra_state" not in k}
        bad = [k for k in others if not torch.equal(after[k], want[k])]
        assert not bad, bad[:5]
        # ... and loading really changed them (the model was built with other values).
        assert sum(not torch.equal(after[k], before[k]) for k in others) >= 80
        assert set(source) == set(LING.expected_keys(no_mtp.model))


def test_training_starts_from_hf_without_mtp(hf_no_mtp, tmp_path):
    overrides = [*TINY, f"checkpoint.init_from_hf={hf_no_mtp}", "trainer.max_steps=3"]
    overrides.append("checkpoint.save_at_end=false")
    proc = run_pretrain(tmp_path / "refused", overrides, check=False)
    assert proc.returncode != 0 and "checkpoint.hf_init_missing_mtp=true" in proc.stderr
    run_pretrain(tmp_path / "run", [*overrides, "checkpoint.hf_init_missing_mtp=true"])
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["mtp_loss"] > 0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_convert_cli_init_missing_mtp(hf_no_mtp, tmp_path):
    proc = run_convert(
        ["hf-to-mcore", "--hf-dir", str(hf_no_mtp), "--out-dir", str(tmp_path / "x"), *TINY_MODEL],
        check=False,
    )
    assert proc.returncode != 0 and "--init-missing-mtp" in proc.stderr
    out = tmp_path / "mcore"
    run_convert(
        ["hf-to-mcore", "--hf-dir", str(hf_no_mtp), "--out-dir", str(out), "--init-missing-mtp"]
        + TINY_MODEL
    )
    assert (out / "latest").read_text().strip() == "iter_0000000"
