"""The IR of attnforge, in one place.

AttentionSite and Decline are defined in attnforge.passes.site (the lowest layer that creates them)
and re-exported here; later issues add the per-head Forms and the Plan.
"""
from attnforge.passes.site import MASK_KINDS, AttentionSite, Decline

__all__ = ["AttentionSite", "Decline", "MASK_KINDS"]
