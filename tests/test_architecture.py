"""The package layering of docs/architecture.md holds: lint-imports keeps the contracts of
pyproject.toml (packages import downward only; training reaches the pretokenizer only through
the built-in corpus builder; no import cycle between any package's modules, function-local
imports counted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, subprocess_env

# import-linter's console script, installed beside this interpreter by the dev extra.
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_are_kept():
    assert LINT_IMPORTS.is_file(), "install the dev extra: pip install -e '.[dev]'"
    proc = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_every_model_family_is_found_by_the_registry():
    from ling_pretrain.models.registry import families

    found = families()
    packages = sorted(
        p.name
        for p in (REPO / "ling_pretrain" / "models").iterdir()
        if p.is_dir() and (p / "__init__.py").is_file()
    )
    assert sorted(f.name for f in found.values()) == packages


def test_the_hf_engine_names_no_model_family():
    """checkpoint/hf/ is generic: no identifier in its code names a family (the families'
    tables live in models/<family>/hf.py)."""
    import io
    import tokenize

    from ling_pretrain.models.registry import families

    names = {f.name for f in families().values()} | {"bailing"}
    found = []
    for path in sorted((REPO / "ling_pretrain" / "checkpoint" / "hf").glob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            word = tok.string.lower()
            if tok.type == tokenize.NAME and word != "ling_pretrain":
                found += [f"{path.name}:{tok.start[0]} {tok.string}" for n in names if n in word]
    assert len(names) >= 4 and found == []


def test_no_test_edits_sys_path():
    """Tests import the package and each other as packages (tests/ has __init__.py files)."""
    offenders = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "tests").rglob("*.py"))
        if "sys.path" in p.read_text() and p.name != "test_architecture.py"
    ]
    assert offenders == []
