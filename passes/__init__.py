"""attnforge.passes: FX graph passes. detect (read-only), canonicalize (sites -> attnforge op)."""
from .canonicalize import ATTENTION_OP, canonicalize
from .detect import NotAttention, detect
from .site import AttentionSite, Decline

__all__ = ["ATTENTION_OP", "AttentionSite", "Decline", "NotAttention", "canonicalize", "detect"]
