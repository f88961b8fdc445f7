"""The generated kernels go through the real Triton compiler down to an sm_90 cubin, no GPU needed.

The interpreter accepts Python that the real compiler rejects (a non-constexpr global, say), so this
complements the interpreter tests. It runs in a subprocess because a Triton imported in interpreter
mode (TRITON_INTERPRET=1, as the rest of the suite runs) cannot compile.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm90_and_bf16_uses_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_sm90.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    from attnforge import codegen
    from attnforge.runtime import kernels

    def configs(plan):
        src = codegen.render_attention(codegen.KernelSpec(causal=True, plan=plan)).source
        return kernels._module_from_source(kernels.source_key(src), src).CONFIGS

    # 36 kernels with a generic signature (6 of them soft-capped), then the plan forward at each autotune config and the dense forward
    # at each TMA one, head dims 64 and 128
    launched_configs = 2 * (len(configs(True)) + sum(c[4] for c in configs(False)))
    assert len(results) == 36 + launched_configs
    assert sum("[softcap]" in r["kernel"] for r in results) == 6
    for r in results:
        assert r["cubin_bytes"] > 0, r
        # decode tiles are 16 rows (mma); the linear state kernel multiplies in fp32 (its sums stay exact)
        if r["dtype"] in ("bf16", "fp16") and "decode" not in r["kernel"] and "_state" not in r["kernel"]:
            assert r["wgmma"], f"{r['kernel']} ({r['dtype']}) does not use Hopper's wgmma"
    # compiled as a GPU launch specializes them: K/V loads pipelined (asynchronous copies into multi-buffered
    # shared memory; TMA configs through the tensor memory accelerator) within an H100's 227 KiB per block
    launched = [r for r in results if r.get("launch")]
    assert len(launched) == launched_configs
    for r in launched:
        assert (r["tma"] if r["config"][4] else r["cp_async"]) > 0, f"{r['kernel']} d={r['head_dim']}: loads not pipelined"
        assert r["shared_bytes"] <= 227 * 1024, r
