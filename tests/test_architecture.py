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
