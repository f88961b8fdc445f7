"""Compile every generated kernel for Hopper (sm_90) ahead of time; no GPU needed. Prints JSON.

Run without TRITON_INTERPRET (an interpreter-mode Triton cannot compile). Used by test_codegen_cuda.py.
Most kernels compile with a generic signature (every integer a plain i32: the worst case). The plan and dense
forwards at their autotune configs compile as a GPU launch would: the module's own `launch` runs on CPU tensors
of a real shape with a stand-in kernel that records its arguments, which are then specialized as Triton's
launcher does (an integer 1 becomes a constant, multiples of 16 and 16-byte-aligned pointers get divisibility
hints). Only then does the compiler know the head dim is contiguous and pipeline the K/V loads (cp.async,
multi-buffered in shared memory): the generic signature shows no pipelining at all.

    python tests/aot_sm90.py --loops [--rev REV]

prints instead the loops of the dense causal and plan forward kernels' SASS (Triton's own nvdisasm):
instructions per loop body, and how many of them are wgmma (HGMMA) and exp2 (MUFU.EX2) — what one key tile
costs in instructions, a static view of kernel changes on a machine without a GPU (not a timing). --rev
renders the templates of a git revision instead of the working tree.
"""
import concurrent.futures
import inspect
import json
import os
import re
import sys

import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from attnforge import codegen
from attnforge.runtime import kernels

CONSTEXPR = ("GROUP", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "EVEN_D", "PRECISION", "SOFTCAP")


class _Recorder:
    """Stands in for a jitted kernel in a module's launch: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _specialize(value):
    """(signature type, attribute) as Triton's launcher gives them for this argument."""
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(BaseBackend, value, False, True, True)


def compile_launch(module, launch_args, launch_kwargs, suffix=""):
    """Compile for sm_90 what `module.launch(<recorder>, *launch_args, **launch_kwargs)` would launch on a GPU
    (its first kernel call; `suffix` names the jitted function), specialized as the runtime would."""
    rec = _Recorder()
    module.launch(rec, *launch_args, **launch_kwargs)
    args, kwargs = rec.calls[0]
    fn = triton.jit(getattr(module, module.KERNEL + suffix))
    names = list(inspect.signature(fn.fn).parameters)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = {**dict(zip(names, args)), **kwargs}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[(i,)] = "constexpr", value
            continue
        sig[name], attr = _specialize(value)
        if sig[name] == "constexpr":
            consts[(i,)] = value
        elif attr and "D" in attr:
            attrs[(i,)] = [["tt.divisibility", 16]]
    ast = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options=options)


def _module(spec, src=None):
    src = src or codegen.render_attention(spec).source
    return kernels._module_from_source(kernels.source_key(src), src)


def _qkv(head_dim, n, heads, dtype):
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    h, hk = heads
    return torch.zeros(1, h, n, head_dim, dtype=dt), torch.zeros(1, hk, n, head_dim, dtype=dt), \
        torch.zeros(1, hk, n, head_dim, dtype=dt)


def compile_plan_launch(head_dim, config=None, n=1024, heads=(9, 3), dtype="bf16", src=None):
    """The plan forward as a GPU launch of `config` (BLOCK_M, BLOCK_N, warps, stages; None: the default GPU
    config) compiles it: a mixed plan (dense, sink + window, block-sparse groups) at length n, its metadata
    built for the config's tile. src: the kernel source (default: this tree's); a revision whose plan tile
    was fixed at 64 x 64 takes (warps, stages) configs."""
    from attnforge.runtime import blockmeta
    from attnforge.runtime.forms import BlockSparse, Dense, SinkWindow, forms_to_json

    module = _module(codegen.KernelSpec(causal=True, plan=True), src)
    config = tuple(config or module.default_config(head_dim, False))
    fixed = len(config) == 2                       # (warps, stages): the tile is the module's BLOCK_M x BLOCK_N
    tile = (module.BLOCK_M, module.BLOCK_N) if fixed else config[:2]
    q, k, v = _qkv(head_dim, n, heads, dtype)
    forms = forms_to_json((Dense(), SinkWindow(64, 256), BlockSparse(64, (0,), (0, 1))))
    meta = blockmeta.block_meta(forms, heads[0] // heads[1], n, n, *tile, "cpu")
    c = compile_launch(module, (q, k, v, q.clone(), head_dim ** -0.5, meta), {"config": config})
    return c, (*tile, *config) if fixed else config


def compile_dense_launch(head_dim, config=None, n=1024, heads=(9, 3), dtype="bf16", src=None):
    """The dense causal forward as a GPU launch of `config` (BLOCK_M, BLOCK_N, warps, stages; None: the
    default GPU config) compiles it."""
    module = _module(codegen.KernelSpec(causal=True), src)
    config = tuple(config or module.default_config(head_dim, False))
    q, k, v = _qkv(head_dim, n, heads, dtype)
    return compile_launch(module, (q, k, v, None, q.clone(), head_dim ** -0.5), {"config": config}), config


def describe(c) -> dict:
    """What a compiled kernel's PTX says about its shape: shared memory, async copies, wgmma."""
    ptx = c.asm["ptx"]
    return {"cubin_bytes": len(c.asm["cubin"]), "shared_bytes": c.metadata.shared,
            "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)), "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "wgmma": bool(re.search(r"wgmma\.mma_async", ptx))}


def compile_sm90(spec, dtype="bf16", head_dim=64, group=3, suffix="", src=None, config=(4, 3), block_m=None,
                 varlen=False, block_n=64, softcap=0.0):
    src = src or codegen.render_attention(spec).source
    module = kernels._module_from_source(kernels.source_key(src), src)
    fn = triton.jit(getattr(module, module.KERNEL + suffix))
    names = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for n in names:
        if n in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "K_DESC", "V_DESC"):   # descriptors: K, V (TMA off)
            sig[n] = f"*{dtype}"
        elif n in ("Lse", "Delta"):
            sig[n] = "*fp32"
        elif n in ("CNT", "FULL", "IDX", "BITS", "CNT_T", "FULL_T", "IDX_T", "SINK", "WIN", "SCHED", "Lens"):  # block metadata, lengths
            sig[n] = "*i32"
        elif n == "M":
            sig[n] = "*i1" if spec.mask == "bool" else "*fp32"
        elif n == "sm_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "constexpr" if n in CONSTEXPR else "i32"
    for flag in ("STORE_LSE", "VARLEN", "SUB_BITS", "TMA"):
        if flag in names:
            sig[flag] = "constexpr"
    block_m = block_m or (64 if spec.plan and suffix else 128)
    consts = {"GROUP": group, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": head_dim, "BLOCK_DV": head_dim,
              "EVEN_D": True, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    if "STORE_LSE" in names:
        consts["STORE_LSE"] = True
    if "SUB_BITS" in names:             # the plan forward: tiles of several 64 x 64 sub-blocks read their bits
        consts["SUB_BITS"] = (block_m, block_n) != (64, 64)
    if "TMA" in names:                  # pointer loads; the TMA variants compile as launches (compile_plan_launch)
        consts["TMA"] = False
    consts["VARLEN"] = varlen
    consts["SOFTCAP"] = softcap         # 0: no soft-cap (compiled out); > 0: Gemma 2's cap * tanh(s / cap)
    ast = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items() if k in names})
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options={"num_warps": config[0], "num_stages": config[1]})


def compile_decode_sm90(dtype="bf16", head_dim=64, rows=16, softcap=0.0):
    """The split-KV decode kernel (query heads of a group packed as the rows of one tile)."""
    src = codegen.render_decode().source
    module = kernels._module_from_source(kernels.source_key(src), src)
    fn = triton.jit(getattr(module, module.KERNEL))
    names = list(inspect.signature(fn.fn).parameters)
    ptr = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "KEEP": "*i8", "OFF": "*i32", "CAP": "*i32",
           "PREFIX": "*i8",
           "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC": "*fp32", "sm_scale": "fp32"}
    consts = {"BLOCK_R": rows, "BLOCK_N": 64, "BLOCK_D": head_dim, "BLOCK_DV": head_dim, "PRECISION": "tf32",
              "SOFTCAP": softcap}
    sig = {n: ptr.get(n, "constexpr" if n in consts else "i32") for n in names}
    ast = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(ast, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4, "num_stages": 2})


def compile_decode_quant_sm90(dtype="bf16", head_dim=64, rows=16, softcap=0.0):
    """The decode kernel over KIVI-quantized groups (codes unpacked and dequantized in registers)."""
    src = codegen.render_decode_quant().source
    module = kernels._module_from_source(kernels.source_key(src), src)
    fn = triton.jit(getattr(module, module.KERNEL))
    names = list(inspect.signature(fn.fn).parameters)
    ptr = {"Q": f"*{dtype}", "KQ": "*u8", "VQ": "*u8", "KS": "*fp16", "KZ": "*fp16", "VS": "*fp16", "VZ": "*fp16",
           "KR": f"*{dtype}", "VR": f"*{dtype}", "META": "*i32", "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC": "*fp32",
           "sm_scale": "fp32"}
    consts = {"BLOCK_R": rows, "BLOCK_N": 64, "BLOCK_D": head_dim, "BLOCK_DV": head_dim, "PRECISION": "tf32",
              "SOFTCAP": softcap}
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


def _wgmma(c) -> bool:
    return bool(re.search(r"wgmma\.mma_async", c.asm["ptx"]))


def _row(job) -> dict:
    """One row of main(), compiled in a worker process: job = (kind, *arguments)."""
    kind, *args = job
    if kind == "generic":                     # an attention kernel with the generic signature
        spec, dtype, d, suffix, varlen, *cap = args
        softcap = cap[0] if cap else 0.0
        c = compile_sm90(spec, dtype, d, suffix=suffix, varlen=varlen, softcap=softcap)
        return {"kernel": spec.name + suffix + ("[varlen]" if varlen else "") + ("[softcap]" if softcap else ""),
                "dtype": dtype, "head_dim": d,
                "cubin_bytes": len(c.asm["cubin"]), "wgmma": _wgmma(c)}
    if kind == "launch":                      # the plan or dense forward as a GPU launch compiles it
        plan, config, d = args
        c, _ = (compile_plan_launch if plan else compile_dense_launch)(d, config)
        name = f"{'x'.join(map(str, config[:2]))},{config[2]}w{config[3]}s{',tma' if config[4] else ''}"
        return {"kernel": f"{codegen.KernelSpec(causal=True, plan=plan).name}[{name}]", "dtype": "bf16",
                "head_dim": d, "launch": True, "config": list(config), **describe(c)}
    if kind in ("decode", "decode_quant"):
        dtype, *cap = args
        softcap = cap[0] if cap else 0.0
        c = (compile_decode_sm90 if kind == "decode" else compile_decode_quant_sm90)(dtype, softcap=softcap)
        name = (codegen.render.DECODE_NAME if kind == "decode" else codegen.render.DECODE_QUANT_NAME) + \
            ("[softcap]" if softcap else "")
        return {"kernel": name, "dtype": dtype, "head_dim": 64, "cubin_bytes": len(c.asm["cubin"]), "wgmma": _wgmma(c)}
    if kind == "combine":
        render = getattr(codegen, args[0])
        c = compile_combine_sm90(render)
        return {"kernel": args[0].replace("render_", "attnforge_") + "_combine", "dtype": "bf16", "head_dim": 64,
                "cubin_bytes": len(c.asm["cubin"]), "wgmma": False}
    part, hedgehog = args                     # "linear"
    c = compile_linear_sm90(part, hedgehog)
    return {"kernel": codegen.render.LINEAR_NAME + part + ("[hedgehog]" if hedgehog else "[taylor2]"),
            "dtype": "bf16" if part != "_decode" else "fp32", "head_dim": 64, "cubin_bytes": len(c.asm["cubin"]),
            "wgmma": _wgmma(c)}


def main():
    """Every kernel, one row each; compiled in one process per core (Triton's compiler is single-threaded)."""
    plan = codegen.KernelSpec(causal=True, plan=True)
    cases = [(codegen.KernelSpec(causal=c, mask=m), "bf16", 64) for c in (False, True)
             for m in (None, "bool", "additive")]
    cases += [(codegen.KernelSpec(causal=True), "fp16", 128), (codegen.KernelSpec(causal=True), "fp32", 64),
              (codegen.KernelSpec(causal=True, window=True), "bf16", 64), (plan, "bf16", 64), (plan, "fp16", 128)]
    jobs = [("generic", spec, dtype, d, "", False) for spec, dtype, d in cases]
    jobs += [("generic", plan, "bf16", 64, suffix, False) for suffix in ("_bwd_dq", "_bwd_dkdv")]
    # padded batches (runtime.padding): the same kernels with per-row lengths
    jobs += [("generic", codegen.KernelSpec(causal=c), "bf16", 64, "", True) for c in (False, True)]
    jobs += [("generic", plan, "bf16", 64, suffix, True) for suffix in ("", "_bwd_dq", "_bwd_dkdv")]
    jobs += [(kind, dtype) for kind in ("decode", "decode_quant") for dtype in ("bf16", "fp16")]
    jobs += [("combine", name) for name in ("render_decode", "render_decode_quant")]
    # soft-capped scores (Gemma 2): the cap's tanh in the forwards, the backward kernels and both decode kernels
    jobs += [("generic", codegen.KernelSpec(causal=True), "bf16", 64, "", False, 50.0)]
    jobs += [("generic", plan, "bf16", 64, suffix, False, 50.0) for suffix in ("", "_bwd_dq", "_bwd_dkdv")]
    jobs += [(kind, "bf16", 50.0) for kind in ("decode", "decode_quant")]
    jobs += [("linear", part, hedgehog) for part in ("", "_state", "_decode") for hedgehog in (False, True)]
    # the plan forward at every autotune config, and the dense forward at its TMA ones, as a GPU launch compiles
    # them (64 x 64 plan tiles without sub-block bits)
    for is_plan in (True, False):
        for config in _module(codegen.KernelSpec(causal=True, plan=is_plan)).CONFIGS:
            if is_plan or config[4]:
                jobs += [("launch", is_plan, tuple(config), d) for d in (64, 128)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        json.dump(list(pool.map(_row, jobs)), sys.stdout)


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
    """The main loops of the dense and plan forwards' SASS at their default GPU configs, compiled as a launch
    compiles them (a mixed plan at 1k tokens; --rev: the templates of that revision, launched the same way)."""
    rows = []
    for plan, d in ((False, 128), (False, 64), (True, 128), (True, 64)):
        spec = codegen.KernelSpec(causal=True, plan=plan)
        src = _render_at(rev, spec) if rev else None
        c, config = (compile_plan_launch if plan else compile_dense_launch)(d, src=src)
        rows.append({"kernel": spec.name, "dtype": "bf16", "head_dim": d, "config": list(config),
                     "revision": rev or "working tree", **describe(c), "loops": sass_loops(c.asm["cubin"])})
    json.dump(rows, sys.stdout, indent=1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", action="store_true", help="SASS loop sizes of the forward kernels")
    parser.add_argument("--rev", help="with --loops: render the templates of this git revision")
    args = parser.parse_args()
    loops_main(args.rev) if args.loops else main()
