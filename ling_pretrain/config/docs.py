"""Generate the configuration reference (docs/configuration.md) from the schema docstrings.

    python -m ling_pretrain.config.docs > docs/configuration.md

A test regenerates it and compares, so the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any

from ling_pretrain.config import schema


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value == "???":
        return "required"
    return f"`{value!r}`" if not dataclasses.is_dataclass(value) else ""


def preset_values(group: str) -> dict[str, dict[str, Any]]:
    """Field -> {preset: value} for the values the presets of ``conf/<group>/`` set."""
    from omegaconf import OmegaConf

    from ling_pretrain.config.checks import CONF_DIR, presets

    out: dict[str, dict[str, Any]] = {}
    for name in presets(group):
        raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
        for key, value in raw.items():
            if key != "defaults":
                out.setdefault(key, {})[name] = value
    return out


def _chosen() -> str:
    """The group presets ``conf/config.yaml`` starts from, as ``group: preset`` text."""
    from omegaconf import OmegaConf

    from ling_pretrain.config.checks import CONF_DIR

    chosen = []
    for entry in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            chosen += [f"`{g}={p}`" for g, p in entry.items() if "/" not in g and " " not in g]
    return ", ".join(chosen)


def _presets_cell(values: dict[str, Any]) -> str:
    return "; ".join(f"`{name}`: `{value!r}`" for name, value in values.items())


def render() -> str:
    """The whole reference as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the docstrings in `ling_pretrain/config/schema.py` by",
        "`python -m ling_pretrain.config.docs`; do not edit by hand.",
        "",
        "Override any field on the command line: `launch/pretrain.py +model=ling_tiny "
        "trainer.max_steps=20 parallel.expert_model_parallel_size=2`. Presets of each group "
        f"live in `conf/<group>/`; `conf/config.yaml` picks one per group ({_chosen()}), "
        "and the *presets* column shows the values each preset sets over the schema default. "
        "A preset chosen on the command line (`data=indexed`) brings its own values and the "
        "schema defaults for the rest.",
        "",
    ]
    hints = typing.get_type_hints(schema.JobConfig)
    for group in dataclasses.fields(schema.JobConfig):
        cls = hints[group.name]
        docs = field_docs(cls)
        lines += [f"## `{group.name}`", "", " ".join((cls.__doc__ or "").split()), ""]
        set_by = preset_values(group.name) if group.name != "run" else {}
        lines += ["| field | default | presets | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = docs.get(f.name, "").replace("|", "\\|")
            cell = _presets_cell(set_by.get(f.name, {})).replace("|", "\\|")
            lines.append(f"| `{group.name}.{f.name}` | {_default(f)} | {cell} | {meaning} |")
        lines.append("")
    lines += [
        "## Benchmark suites (`conf/benchmark/`)",
        "",
        "Read by `launch/benchmark.py suite NAME` (docs/benchmarks.md), not by training jobs.",
        "",
    ]
    for cls in (schema.BenchmarkSuite, schema.BenchmarkPoint):
        docs = field_docs(cls)
        lines += [f"### `{cls.__name__}`", "", " ".join((cls.__doc__ or "").split()), ""]
        lines += ["| field | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {_default(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
