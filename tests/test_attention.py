"""Causal self-attention (model/attention.py) against a hand-written per-position attention in float64:
RoPE tables by hand, a full forward and one fed through a cache in chunks."""

import math

import pytest
import torch

from hybridchat.model.cache import InferenceCache


def test_rotary_tables_by_hand():
    """Angle of position t, pair i: t / base^(2i / head_dim), positions from `offset` (0 by default)."""
    from hybridchat.model.attention import rotary_cos_sin

    for offset, kwargs in ((0, {}), (5, {"offset": 5})):
        cos, sin = rotary_cos_sin(3, 8, 100.0, **kwargs)
        assert cos.shape == sin.shape == (1, 1, 3, 4) and cos.dtype == torch.float32
        for t in range(3):
            for i in range(4):
                angle = (offset + t) / 100.0 ** (2 * i / 8)
                assert cos[0, 0, t, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert sin[0, 0, t, i].item() == pytest.approx(math.sin(angle), abs=1e-6)


def attention_reference(attn, u, base=10000.0):
    """Causal self-attention written out per position in float64 from the layer's weights: RoPE on
    pairs (i, i + head_dim/2) at angle t / base^(2i / head_dim), RMS-normed q and k per head, scores
    q.k / sqrt(head_dim), query head h reading KV head h // (n_head / n_kv_head), then c_proj."""
    H, KV, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    B, T, _ = u.shape
    q = (u @ attn.c_q.weight.detach().T).view(B, T, H, hd)
    k = (u @ attn.c_k.weight.detach().T).view(B, T, KV, hd)
    v = (u @ attn.c_v.weight.detach().T).view(B, T, KV, hd)

    def rope(x):
        out = x.clone()
        for t in range(T):
            for i in range(hd // 2):
                a, b = x[:, t, :, i], x[:, t, :, i + hd // 2]
                angle = t / base ** (2 * i / hd)
                out[:, t, :, i] = a * math.cos(angle) - b * math.sin(angle)
                out[:, t, :, i + hd // 2] = a * math.sin(angle) + b * math.cos(angle)
        return out

    def rms(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    q, k = rms(rope(q)), rms(rope(k))
    y = torch.zeros(B, T, H, hd, dtype=u.dtype)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                g = h // (H // KV)
                scores = torch.stack([q[b, t, h] @ k[b, s, g] for s in range(t + 1)]) / math.sqrt(hd)
                w = torch.softmax(scores, 0)
                y[b, t, h] = sum(w[s] * v[b, s, g] for s in range(t + 1))
    return y.reshape(B, T, H * hd) @ attn.c_proj.weight.detach().T


def test_attention_layer_equals_a_hand_written_causal_attention_full_and_cached():
    """A layer built with its defaults (layer 0, QK-norm on): a full forward, and one fed through a
    cache as 1 token, a chunk of 4 (past = 1: bottom-right causal mask), a chunk of 3, then single
    tokens, equal the hand-written attention."""
    from hybridchat.model.attention import CausalSelfAttention, rotary_cos_sin

    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 2).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.4)
    u = torch.randn(2, 11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = attention_reference(attn, u)
    with torch.no_grad():
        full = attn(u, rotary_cos_sin(11, 8, 10000.0))
        cache = InferenceCache.allocate([attn], 2, 11, dtype=torch.float64)
        parts = []
        for lo, hi in ((0, 1), (1, 5), (5, 8), (8, 9), (9, 10), (10, 11)):
            parts.append(attn(u[:, lo:hi], rotary_cos_sin(hi - lo, 8, 10000.0, offset=lo), cache))
            cache.advance(hi - lo)
    # RoPE's tables are float32 (angles rounded to ~1e-7 relative): hence 1e-5, not float64's 1e-12.
    assert expected.abs().max() > 1
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(parts, 1), expected, rtol=1e-5, atol=1e-5)
