"""Our model, loaded from an HF checkpoint written by NeMo AutoModel's independent Ling 2.0
implementation, gives NeMo's logits (and the MTP formula's) in fp32 at every layout.

The checkpoint, token file and reference logits come from ``nemo_ling.py`` (random weights,
random norm weights, random non-zero expert bias). ``launch/evaluate.py`` is run as a user
runs it. NeMo AutoModel is a test dependency (``pip install --no-deps nemo-automodel==0.7.0``,
the README's test command does it); without it these tests fail, unless
``LING_SKIP_NEMO_PARITY=1`` says to skip them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, script_cmd, subprocess_env

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
EVALUATE = REPO / "launch" / "evaluate.py"
CONVERT = REPO / "launch" / "convert.py"
TOLERANCE = 1e-4

LAYOUTS = {
    "tp1_ep1_pp1": (1, []),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "ep2": (2, ["parallel.expert_model_parallel_size=2"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
}


def _require_nemo() -> None:
    if importlib.util.find_spec("nemo_automodel") is not None:
        return
    if os.environ.get("LING_SKIP_NEMO_PARITY") == "1":
        pytest.skip("LING_SKIP_NEMO_PARITY=1: NeMo AutoModel parity not checked")
    pytest.fail(
        "NeMo AutoModel is needed for the parity tests: pip install --no-deps "
        "nemo-automodel==0.7.0 (transformers==5.18.0 comes with the dev extra); set "
        "LING_SKIP_NEMO_PARITY=1 to skip them."
    )


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def nemo_checkpoint(tmp_path_factory) -> dict:
    _require_nemo()
    out = tmp_path_factory.mktemp("nemo_ling")
    _run([sys.executable, str(HERE / "nemo_ling.py"), str(out)])
    ref = np.load(out / "reference.npz")
    return {
        "dir": out,
        "hf": out / "hf",
        "tokens": out / "tokens.npy",
        "logits": ref["logits"],
        "mtp_logits": ref["mtp_logits"],
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _ce(logits: np.ndarray, targets: np.ndarray) -> float:
    logp = _log_softmax(logits)
    return float(-np.take_along_axis(logp, targets[..., None], axis=-1).mean())


def _evaluate(ck: dict, out: Path, nproc: int, extra: list[str], checkpoint: Path) -> tuple:
    logits_file, json_file = out / "logits.npz", out / "eval.json"
    proc = _run(
        script_cmd(
            EVALUATE,
            [
                "--checkpoint",
                str(checkpoint),
                "--tokens",
                str(ck["tokens"]),
                "--batch-size",
                "2",
                "--save-logits",
                str(logits_file),
                "--output",
                str(json_file),
                *extra,
            ],
            nproc,
        )
    )
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(json_file.read_text())
    got = np.load(logits_file)
    return printed, got


def _check_against_reference(ck: dict, result: dict, got) -> dict:
    tokens = np.load(ck["tokens"]).astype(np.int64)
    diffs = {}
    for key in ("logits", "mtp_logits"):
        assert got[key].dtype == np.float32 and got[key].shape == ck[key].shape, key
        diffs[key] = float(np.abs(got[key] - ck[key]).max())
        assert diffs[key] <= TOLERANCE, (key, diffs[key])
    # The reported losses are the reference logits' cross entropies (LM: next token; MTP:
    # the token after it), and perplexity is exp(LM loss).
    lm = _ce(ck["logits"][:, :-1], tokens[:, 1:])
    mtp = _ce(ck["mtp_logits"][:, :-2], tokens[:, 2:])
    assert result["lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert result["mtp_loss"] == pytest.approx(mtp, abs=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(result["lm_loss"]), rel=1e-9)
    assert result["lm_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)
    assert result["mtp_tokens"] == tokens.shape[0] * (tokens.shape[1] - 2)
    return diffs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_checkpoint_from_nemo_gives_nemo_logits(nemo_checkpoint, tmp_path, layout):
    nproc, extra = LAYOUTS[layout]
    ck = nemo_checkpoint
    result, got = _evaluate(ck, tmp_path, nproc, extra, ck["hf"])
    assert result["checkpoint_format"] == "hf" and result["params_dtype"] == "fp32"
    diffs = _check_against_reference(ck, result, got)
    print(
        f"{layout}: max |logits - NeMo| {diffs['logits']:.2e}, "
        f"max |mtp_logits - formula| {diffs['mtp_logits']:.2e}"
    )


def test_converted_megatron_checkpoint_gives_the_same_logits(nemo_checkpoint, tmp_path):
    """HF -> megatron (launch/convert.py) -> evaluate, model taken from the saved config."""
    ck = nemo_checkpoint
    mcore = tmp_path / "mcore"
    _run(
        [
            sys.executable,
            str(CONVERT),
            "hf-to-mcore",
            "--hf-dir",
            str(ck["hf"]),
            "--out-dir",
            str(mcore),
        ]
    )
    result, got = _evaluate(ck, tmp_path, 1, [], mcore)
    assert result["checkpoint_format"] == "megatron"
    _check_against_reference(ck, result, got)
