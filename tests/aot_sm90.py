"""Compile every generated kernel for Hopper (sm_90) ahead of time; no GPU needed. Prints JSON.

Run without TRITON_INTERPRET (an interpreter-mode Triton cannot compile). Used by test_codegen_cuda.py.

    python tests/aot_sm90.py --loops [--rev REV]

prints instead the loops of the dense causal and plan forward kernels' SASS (Triton's own nvdisasm):
instructions per loop body, and how many of them are wgmma (HGMMA) and exp2 (MUFU.EX2) — what one key tile
costs in instructions, a static view of kernel changes on a machine without a GPU (not a timing). --rev
renders the templates of a git revision instead of the working tree.
"""
import inspect
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnforge import codegen
from attnforge.runtime import kernels

CONSTEXPR = ("GROUP", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "EVEN_D", "PRECISION")


def compile_sm90(spec, dtype="bf16", head_dim=64, group=3, suffix="", src=None, config=(4, 3), block_m=None,
                 varlen=False):
    src = src or codegen.render_attention(spec).source
    module = kernels._module_from_source(kernels.source_key(src), src)
    fn = triton.jit(getattr(module, module.KERNEL + suffix))
    names = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for n in names:
        if n in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            sig[n] = f"*{dtype}"
        elif n in ("Lse", "Delta"):
            sig[n] = "*fp32"
        elif n in ("CNT", "FULL", "IDX", "CNT_T", "FULL_T", "IDX_T", "SINK", "WIN", "SCHED", "Lens"):  # block metadata, lengths
            sig[n] = "*i32"
        elif n == "M":
            sig[n] = "*i1" if spec.mask == "bool" else "*fp32"
        elif n == "sm_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "constexpr" if n in CONSTEXPR else "i32"
    for flag in ("STORE_LSE", "VARLEN"):
        if flag in names:
            sig[flag] = "constexpr"
    block_m = block_m or (64 if spec.plan else 128)
    consts = {"GROUP": group, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_D": head_dim, "BLOCK_DV": head_dim,
              "EVEN_D": True, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    if "STORE_LSE" in names:
        consts["STORE_LSE"] = True
    consts["VARLEN"] = varlen
    ast = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items() if k in names})
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options={"num_warps": config[0], "num_stages": config[1]})


def compile_decode_sm90(dtype="bf16", head_dim=64, rows=16):
    """The split-KV decode kernel (query heads of a group packed as the rows of one tile)."""
    src = codegen.render_decode().source
    module = kernels._module_from_source(kernels.source_key(src), src)
    fn = triton.jit(getattr(module, module.KERNEL))
    names = list(inspect.signature(fn.fn).parameters)
    ptr = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "KEEP": "*i8", "OFF": "*i32", "CAP": "*i32",
           "PREFIX": "*i8",
           "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC": "*fp32", "sm_scale": "fp32"}
    consts = {"BLOCK_R": rows, "BLOCK_N": 64, "BLOCK_D": head_dim, "BLOCK_DV": head_dim, "PRECISION": "tf32"}
    sig = {n: ptr.get(n, "constexpr" if n in consts else "i32") for n in names}
    ast = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": 2})


def compile_decode_quant_sm90(dtype="bf16", head_dim=64, rows=16):
    """The decode kernel over KIVI-quantized groups (codes unpacked and dequantized in registers)."""
    src = codegen.render_decode_quant().source
    module = kernels._module_from_source(kernels.source_key(src), src)
    fn = triton.jit(getattr(module, module.KERNEL))
    names = list(inspect.signature(fn.fn).parameters)
    ptr = {"Q": f"*{dtype}", "KQ": "*u8", "VQ": "*u8", "KS": "*fp16", "KZ": "*fp16", "VS": "*fp16", "VZ": "*fp16",
           "KR": f"*{dtype}", "VR": f"*{dtype}", "META": "*i32", "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC": "*fp32",
           "sm_scale": "fp32"}
    consts = {"BLOCK_R": rows, "BLOCK_N": 64, "BLOCK_D": head_dim, "BLOCK_DV": head_dim, "PRECISION": "tf32"}
    sig = {n: ptr.get(n, "constexpr" if n in consts else "i32") for n in names}
    ast = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": 2})


def compile_combine_sm90(render, dtype="bf16", rows=16, dv=64):
    """Flash-decoding's merge of the split partial states (the decode kernels' second launch)."""
    src = render().source
    module = kernels._module_from_source(kernels.source_key(src), src)
    fn = getattr(module, module.KERNEL + "_combine")
    names = list(inspect.signature(fn.fn).parameters)
    ptr = {"M": "*fp32", "L": "*fp32", "ACC": "*fp32", "Out": f"*{dtype}"}
    consts = {"BLOCK_R": rows, "BLOCK_DV": dv}
    sig = {n: ptr.get(n, "constexpr" if n in consts else "i32") for n in names}
    ast = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": 1})


def compile_linear_sm90(part: str, hedgehog: bool, dtype="bf16", head_dim=64):
    """The linear-hybrid kernels: the query-chunk kernel (part ""), "_state" and "_decode"."""
    src = codegen.render_linear().source
    module = kernels._module_from_source(kernels.source_key(src), src)
    obj = getattr(module, module.KERNEL + part)
    fn = obj if isinstance(obj, triton.runtime.JITFunction) else triton.jit(obj)
    names = list(inspect.signature(fn.fn).parameters)
    io = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "OUT": f"*{dtype}"}
    if part == "_decode":
        io = {n: "*fp32" for n in ("Q", "KE", "VE", "OUT")}
    f32 = {n: "*fp32" for n in ("P", "P0", "Z", "Z0", "WQ", "WK")}
    consts = {"HEDGEHOG": hedgehog, "C": 64, "BLOCK_D": head_dim, "BLOCK_DV": head_dim,
              "A": 2 if hedgehog else head_dim + 1, "PRECISION": "tf32", "UPCAST": False, "BLOCK_R": 16,
              "BLOCK_E": 64}
    sig = {n: io.get(n) or f32.get(n) or ("fp32" if n in ("sm_scale", "gain") else
                                         "constexpr" if n in consts else "i32") for n in names}
    ast = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items() if k in names})
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": 2})


def main():
    cases = [(codegen.KernelSpec(causal=c, mask=m), "bf16", 64) for c in (False, True)
             for m in (None, "bool", "additive")]
    cases += [(codegen.KernelSpec(causal=True), "fp16", 128), (codegen.KernelSpec(causal=True), "fp32", 64),
              (codegen.KernelSpec(causal=True, window=True), "bf16", 64),
              (codegen.KernelSpec(causal=True, plan=True), "bf16", 64),
              (codegen.KernelSpec(causal=True, plan=True), "fp16", 128)]
    results = []
    cases += [(codegen.KernelSpec(causal=True, plan=True), "bf16", 64, suffix) for suffix in ("_bwd_dq", "_bwd_dkdv")]
    # padded batches (runtime.padding): the same kernels with per-row lengths
    cases += [(codegen.KernelSpec(causal=c), "bf16", 64, "", True) for c in (False, True)]
    cases += [(codegen.KernelSpec(causal=True, plan=True), "bf16", 64, suffix, True) for suffix in ("", "_bwd_dq", "_bwd_dkdv")]
    for spec, dtype, d, *extra in cases:
        suffix, varlen = extra[0] if extra else "", len(extra) > 1 and extra[1]
        c = compile_sm90(spec, dtype, d, suffix=suffix, varlen=varlen)
        results.append({"kernel": spec.name + suffix + ("[varlen]" if varlen else ""), "dtype": dtype, "head_dim": d,
                        "cubin_bytes": len(c.asm["cubin"]), "wgmma": bool(re.search(r"wgmma\.mma_async", c.asm["ptx"]))})
    for dtype in ("bf16", "fp16"):
        c = compile_decode_sm90(dtype)
        results.append({"kernel": codegen.render.DECODE_NAME, "dtype": dtype, "head_dim": 64,
                        "cubin_bytes": len(c.asm["cubin"]), "wgmma": bool(re.search(r"wgmma\.mma_async", c.asm["ptx"]))})
    for dtype in ("bf16", "fp16"):
        c = compile_decode_quant_sm90(dtype)
        results.append({"kernel": codegen.render.DECODE_QUANT_NAME, "dtype": dtype, "head_dim": 64,
                        "cubin_bytes": len(c.asm["cubin"]), "wgmma": bool(re.search(r"wgmma\.mma_async", c.asm["ptx"]))})
    for render in (codegen.render_decode, codegen.render_decode_quant):
        c = compile_combine_sm90(render)
        results.append({"kernel": render.__name__.replace("render_", "attnforge_") + "_combine", "dtype": "bf16",
                        "head_dim": 64, "cubin_bytes": len(c.asm["cubin"]), "wgmma": False})
    for part in ("", "_state", "_decode"):
        for hedgehog in (False, True):
            c = compile_linear_sm90(part, hedgehog)
            results.append({"kernel": codegen.render.LINEAR_NAME + part + ("[hedgehog]" if hedgehog else "[taylor2]"),
                            "dtype": "bf16" if part != "_decode" else "fp32", "head_dim": 64,
                            "cubin_bytes": len(c.asm["cubin"]), "wgmma": bool(re.search(r"wgmma\.mma_async", c.asm["ptx"]))})
    json.dump(results, sys.stdout)


def _render_at(rev, spec):
    """The kernel source of `spec` rendered from the templates of git revision `rev`."""
    import subprocess
    import tempfile
    from pathlib import Path

    import jinja2

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as d:
        for name in subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:codegen/templates"], cwd=root,
                                   check=True, capture_output=True, text=True).stdout.split():
            text = subprocess.run(["git", "show", f"{rev}:codegen/templates/{name}"], cwd=root, check=True,
                                  capture_output=True, text=True).stdout
            Path(d, name).write_text(text)
        return codegen.render_attention(spec, codegen.render.environment(jinja2.FileSystemLoader(d))).source


def sass_loops(cubin: bytes) -> list[dict]:
    """The loops of a cubin's SASS (a backward branch to an earlier label): size and wgmma / exp2 counts."""
    import os
    import subprocess
    import tempfile

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], check=True, capture_output=True, text=True).stdout
    labels, code = {}, []
    for line in text.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(code)
        elif re.search(r"/\*[0-9a-f]{4,}\*/", line):
            code.append(line)
    loops = []
    for i, line in enumerate(code):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = code[labels[m.group(1)]:i + 1]
            if len(body) > 1:
                loops.append({"instructions": len(body), "hgmma": sum("HGMMA" in b for b in body),
                              "ex2": sum("MUFU.EX2" in b for b in body)})
    return loops


def loops_main(rev=None):
    rows = []
    for spec, d, block_m, config in ((codegen.KernelSpec(causal=True), 128, 128, (8, 2)),
                                     (codegen.KernelSpec(causal=True), 64, 128, (4, 3)),
                                     (codegen.KernelSpec(causal=True, plan=True), 128, 64, (8, 2)),
                                     (codegen.KernelSpec(causal=True, plan=True), 64, 64, (4, 3))):
        src = _render_at(rev, spec) if rev else None
        c = compile_sm90(spec, "bf16", d, group=1, src=src, config=config, block_m=block_m)
        rows.append({"kernel": spec.name, "dtype": "bf16", "head_dim": d, "tile": [block_m, 64],
                     "warps_stages": list(config), "revision": rev or "working tree", "loops": sass_loops(c.asm["cubin"])})
    json.dump(rows, sys.stdout, indent=1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", action="store_true", help="SASS loop sizes of the forward kernels")
    parser.add_argument("--rev", help="with --loops: render the templates of this git revision")
    args = parser.parse_args()
    loops_main(args.rev) if args.loops else main()
