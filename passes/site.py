"""IR records produced by detection: where attention is (`AttentionSite`) and what was declined.

They live here, in the lowest layer that creates them, and are re-exported by attnforge.compiler.ir.
Sizes that depend on batch or sequence length are kept as strings ("s0", "256"), so that a site prints
and serializes the same whether its graph was captured with static or symbolic shapes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .transforms import Operand

__all__ = ["AttentionSite", "Decline", "MASK_KINDS", "Operand"]

# none: no mask; causal / window: only that structure (no tensor); boolean / additive: an exact mask
# tensor is carried (with causal/window structure on top when both were present); padding: a padded batch
# (attnforge's padding_mask op, see compiler.hf): the op gets the [B, S] padding vector (`padding`), causal
# is then aligned bottom-right (queries are the last N keys) and mask_operand is the padding op's mask.
MASK_KINDS = ("none", "causal", "window", "boolean", "additive", "padding")


@dataclass(frozen=True, slots=True)
class AttentionSite:
    id: str                 # stable: "<module path>#<order within that module>", e.g. "model.layers.3.self_attn#0"
    module_path: str
    spelling: str           # which rule matched: "sdpa" | "matmul_softmax" | ...
    output: str             # FX node whose value the site computes (in the graph it was found in)
    q: Operand              # q/k/v/mask: node + transforms to the canonical [B, H, N, D] layout
    k: Operand              # K and V before any repeat_kv expansion
    v: Operand
    mask_operand: Operand | None
    out_ops: tuple          # transforms from the op's [B, H, N, Dv] back to the graph's layout
    batch: str              # [B, H, N, D] sizes
    q_len: str
    kv_len: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    causal: bool            # top-left aligned, as SDPA's is_causal
    window: int             # > 0: query i also sees only keys j > i - window (sliding window); 0: none
    mask: str               # one of MASK_KINDS
    scale: float
    dtype: str
    softmax_dtype: str      # dtype the softmax ran in, in the original graph
    dropout: float          # always 0.0 for a rewritten site: dropout sites are declined
    padding: Operand | None = None      # mask "padding": the [B, S] key-padding vector the op takes
    softcap: float = 0.0    # > 0: scores soft-capped before the masks, softcap * tanh(s * scale / softcap) (Gemma 2)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Decline:
    """A near miss: something that looked like attention and was left alone, and why."""
    node: str
    module_path: str
    rule: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)
