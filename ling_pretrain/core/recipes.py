"""The one registry of FP8 recipes: every ``fp8.recipe`` name and what it means.

Validation, the megatron-core config mapping, the CPU emulation, the memory model and the
command-line tools all read recipe properties from here, so adding a recipe is one entry.
A recipe's YAML preset lives in ``conf/fp8/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ling_pretrain.core.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class FP8Recipe:
    """One numeric recipe of the GEMMs."""

    name: str
    """The ``fp8.recipe`` value."""
    description: str
    """One line for help texts."""
    megatron_format: str | None = None
    """megatron-core ``fp8`` (``e4m3`` or ``hybrid``: E4M3 forward, E5M2 gradients); None
    for no FP8."""
    megatron_recipe: str | None = None
    """megatron-core ``fp8_recipe`` (``blockwise``, ``tensorwise``, ``mxfp8``)."""
    scaling: str | None = None
    """How scales are kept: ``blockwise`` (1x128 tiles, 128x128 weight blocks, fp32 scales),
    ``tensorwise`` (one scale per tensor) or ``mxfp8`` (1x32 blocks, E8M0 scales)."""
    fp8_primary_weights: bool = False
    """Keep the weights of FP8 GEMMs as FP8 (megatron ``fp8_param``) whatever
    ``fp8.fp8_param_gather`` says."""
    min_compute_capability: tuple[int, int] | None = None
    """Oldest GPU that runs it on TransformerEngine (Hopper 9.0, Blackwell 10.0)."""

    @property
    def is_fp8(self) -> bool:
        """Whether any GEMM runs in FP8."""
        return self.megatron_format is not None

    @property
    def block_scaled(self) -> bool:
        """Scales per block, so zero-probability padding tokens do not change any scale."""
        return self.scaling in ("blockwise", "mxfp8")

    @property
    def weight_blocks_square(self) -> bool:
        """128x128 weight blocks: the transposed FP8 weight has the same scales, so it can be
        built from the row-wise copy on demand (lossless)."""
        return self.scaling == "blockwise"

    @property
    def formats(self) -> tuple[str, str]:
        """(forward, gradient) FP8 formats."""
        if self.megatron_format == "hybrid":
            return "e4m3", "e5m2"
        return self.megatron_format or "", self.megatron_format or ""


RECIPES: dict[str, FP8Recipe] = {
    r.name: r
    for r in (
        FP8Recipe(name="bf16", description="FP8 off: every GEMM in BF16 (or params_dtype)"),
        FP8Recipe(
            name="blockwise",
            description="Ling 2.0's recipe: E4M3, 1x128 tiles, 128x128 weight blocks",
            megatron_format="e4m3",
            megatron_recipe="blockwise",
            scaling="blockwise",
            min_compute_capability=(9, 0),
        ),
        FP8Recipe(
            name="blockwise_fp8_params",
            description="blockwise with FP8 primary weights (Ling's memory savings)",
            megatron_format="e4m3",
            megatron_recipe="blockwise",
            scaling="blockwise",
            fp8_primary_weights=True,
            min_compute_capability=(9, 0),
        ),
        FP8Recipe(
            name="tensorwise",
            description="per-tensor scales, E4M3 forward and E5M2 gradients",
            megatron_format="hybrid",
            megatron_recipe="tensorwise",
            scaling="tensorwise",
        ),
        FP8Recipe(
            name="mxfp8",
            description="MXFP8 (Blackwell): 1x32 blocks with E8M0 scales",
            megatron_format="e4m3",
            megatron_recipe="mxfp8",
            scaling="mxfp8",
            min_compute_capability=(10, 0),
        ),
    )
}
"""Every recipe by name, ``bf16`` (FP8 off) first."""

FP8_RECIPE_NAMES: tuple[str, ...] = tuple(name for name, r in RECIPES.items() if r.is_fp8)
"""The recipes that run GEMMs in FP8 (everything but ``bf16``)."""


def get_recipe(name: str) -> FP8Recipe:
    """The recipe called ``name``.

    Raises:
        ConfigError: naming the valid recipes.
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(
            f"fp8.recipe={name!r} is not a recipe; choose one of {', '.join(RECIPES)} "
            "(fp8=<name> on the command line)."
        ) from None
