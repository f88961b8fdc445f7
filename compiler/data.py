"""Real text that is on every machine with Python: the reference documentation in `pydoc_data`.

Used as the default input of the built-in examples (never downloaded). `sample_text(offset)` takes
topics in a fixed order, so runs are reproducible for a given Python version; different offsets give
disjoint text (calibration vs evaluation).
"""
from __future__ import annotations

__all__ = ["sample_text"]


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def sample_text(min_chars: int = 4000, offset: int = 0) -> str:
    """At least `min_chars` characters of English prose, starting at topic number `offset`."""
    topics = _topics()
    parts, total = [], 0
    for body in topics[offset:] + topics[:offset]:
        parts.append(body.strip())
        total += len(parts[-1])
        if total >= min_chars:
            break
    return "\n\n".join(parts)
