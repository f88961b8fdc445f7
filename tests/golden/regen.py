"""Regenerate the golden kernel sources: python tests/golden/regen.py (then review the diff)."""
from pathlib import Path

from attnforge.codegen import KernelSpec, render_attention, render_decode, render_decode_quant, render_linear

SPECS = [KernelSpec(causal=c, mask=m) for c in (False, True) for m in (None, "bool", "additive")]
SPECS += [KernelSpec(causal=True, window=True), KernelSpec(causal=False, window=True, mask="additive"),
          KernelSpec(causal=True, plan=True)]


def main():
    here = Path(__file__).parent
    for spec in SPECS:
        (here / f"{spec.name}.py.txt").write_text(render_attention(spec).source)
    (here / "attnforge_decode_splitkv.py.txt").write_text(render_decode().source)
    (here / "attnforge_decode_quant.py.txt").write_text(render_decode_quant().source)
    (here / "attnforge_linear_hybrid.py.txt").write_text(render_linear().source)


if __name__ == "__main__":
    main()
