"""Measure a plan: perplexity on real text, and passkey retrieval, through the attnforge backend.

Both run the model compiled with `Backend(plan=..., compiler="eager")`, so every site runs the attnforge
op with its plan entry (the exact reference masks on the CPU).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .api import _first_tensor
from .backend import Backend
from .capture import compile_traced
from .data import _topics
from .profile import RecallWindow

__all__ = ["text_tokens", "windows", "recall_windows", "calibration_windows", "perplexity", "passkey_prompts", "passkey_accuracy", "CALIBRATION", "EVALUATION"]

CALIBRATION = range(0, 40)       # pydoc topics used for profiling
EVALUATION = range(40, 79)       # held out: never profiled


def text_tokens(tokenizer, topics=CALIBRATION) -> torch.Tensor:
    """[1, T] token ids of the given pydoc reference topics, in order."""
    all_topics = _topics()
    text = "\n\n".join(all_topics[i].strip() for i in topics if i < len(all_topics))
    return tokenizer(text, return_tensors="pt").input_ids


def windows(tokens: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """`count` disjoint [1, length] windows from the start of `tokens`."""
    if tokens.shape[1] < length * count:
        raise ValueError(f"{tokens.shape[1]} tokens are not enough for {count} windows of {length}")
    return [tokens[:, i * length:(i + 1) * length] for i in range(count)]


def recall_windows(tokens: torch.Tensor, length: int, count: int, copy: float = 0.125,
                   offset: int = 0) -> list[RecallWindow]:
    """`count` [1, length] windows of long-range recall (DuoAttention-style synthetic calibration): the
    last `copy` of each window repeats a segment from its first half, so predicting it needs attention
    to keys thousands of tokens back. Plain text alone rarely does, and a plan profiled only on it
    starves the heads that retrieve. Windows start after `offset` windows of `tokens`. Each is a
    RecallWindow (ids and where the copy comes from), so the profile also records the retrieval mass."""
    out = []
    tail = max(1, int(length * copy))
    for w in windows(tokens, length, offset + count)[offset:]:
        ids = w.clone()
        src = length // 8                                  # far back: the copy sits ~3/4 of the window away
        ids[0, length - tail:] = w[0, src:src + tail]
        out.append(RecallWindow(ids, src, length - tail, tail))
    return out


def calibration_windows(tokens: torch.Tensor, length: int, plain: int = 2,
                        recall: int = 2) -> list[torch.Tensor | RecallWindow]:
    """The calibration set at one length: `plain` text windows and `recall` long-range recall windows,
    interleaved over consecutive windows of `tokens` (plain, recall, plain, recall, ...), so both kinds
    cover the same spread of topics. With one sample per kind the profile is noisy enough to move the
    search's choice at tight budgets; two of each was the smallest set that stayed stable on SmolLM2."""
    if plain < 0 or recall < 0 or plain + recall == 0:
        raise ValueError(f"need at least one calibration window (plain={plain}, recall={recall})")
    out, p, r = [], 0, 0
    for slot in range(plain + recall):
        if p < plain and (r >= recall or slot % 2 == 0):
            out.append(windows(tokens, length, slot + 1)[slot])
            p += 1
        else:
            out.append(recall_windows(tokens, length, 1, offset=slot)[0])
            r += 1
    return out


def _compiled(model, plan):
    torch._dynamo.reset()
    return compile_traced(model, backend=Backend(plan=plan, compiler="eager"), dynamic=False)


@torch.no_grad()
def perplexity(model, plan, samples: list[torch.Tensor]) -> float:
    """exp(mean next-token cross entropy) over the samples, running `plan` (None: dense)."""
    run = _compiled(model, plan)
    nll, count = 0.0, 0
    for ids in samples:
        logits = _first_tensor(run(ids)).float()
        nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    torch._dynamo.reset()
    return math.exp(nll / count)


def passkey_prompts(tokenizer, length: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0):
    """(ids, answer ids) pairs: a 5-digit key hidden at each depth of `length` tokens of filler text."""
    rng = random.Random(seed)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    f_ids = tokenizer(filler).input_ids
    prompts = []
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ").input_ids
        question = tokenizer(" What is the pass key? The pass key is").input_ids
        answer = tokenizer(f" {key}").input_ids
        room = length - len(needle) - len(question) - len(answer)
        body = (f_ids * (room // len(f_ids) + 1))[:room]
        at = int(room * depth)
        ids = body[:at] + needle + body[at:] + question + answer
        prompts.append((torch.tensor([ids]), len(answer)))
    return prompts


@torch.no_grad()
def passkey_accuracy(model, plan, prompts) -> float:
    """Fraction of prompts whose key the model reproduces exactly (greedy, teacher-forced over the key)."""
    run = _compiled(model, plan)
    hits = 0
    for ids, n_answer in prompts:
        logits = _first_tensor(run(ids))
        predicted = logits[0, -n_answer - 1:-1].argmax(-1)
        hits += bool((predicted == ids[0, -n_answer:]).all())
    torch._dynamo.reset()
    return hits / len(prompts)
