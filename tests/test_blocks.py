"""Blocks (model/blocks.py): block patterns by hand, the config's recipe reaching every layer, a block
built on its own, the relu^2 MLP by hand."""

import dataclasses

import pytest
import torch
from conftest import TINY_VOCAB

from hybridchat.core.errors import UserError
from hybridchat.model.blocks import expand_pattern
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM

# ---- block patterns ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,n_layer,letters", [
    ("all_attention", 3, "AAA"),
    ("all_mamba", 3, "MMM"),
    ("alternating", 5, "MAMAM"),
    ("early_attention_late_mamba", 8, "AAMMMMMM"),  # a quarter attention, first
    ("early_attention_late_mamba", 3, "AMM"),  # at least one
    ("jamba", 16, "MMMMAMMMMMMMAMMM"),  # layer 4 of every 8
    ("jamba", 5, "MMMMA"),
    ("jamba", 4, "MMAM"),  # no layer 4: one attention in the middle, round(4 / 2) = 2
    ("jamba", 3, "MMA"),  # round(1.5) = 2
    ("nemotron", 25, "MMMMMMMMAMMMMMMMMAMMMMMMM"),  # round(0.08 * 25) = 2 at round(25/3) = 8, round(50/3) = 17
    ("nemotron", 12, "MMMMMMAMMMMM"),  # round(0.96) = 1 at 6
    ("nemotron", 4, "MMAM"),  # round(0.32) = 0 -> at least 1
])
def test_pattern_presets_by_hand(preset, n_layer, letters):
    assert expand_pattern(preset, n_layer) == letters


def test_pattern_letters_are_tiled_or_refused_with_the_reason():
    assert expand_pattern(" am ", 4) == "AMAM"
    allowed = ("letters ['A', 'M'] (tiled when their count divides n_layer) or a preset ['all_attention', "
               "'all_mamba', 'alternating', 'early_attention_late_mamba', 'jamba', 'nemotron']")
    with pytest.raises(UserError) as e:
        expand_pattern("  ", 4)
    assert str(e.value) == f"model.block_pattern is empty; give {allowed}"
    with pytest.raises(UserError) as e:
        expand_pattern("MAXq", 4)
    assert str(e.value) == f"model.block_pattern='MAXq' has unknown letter(s) ['Q', 'X']; allowed: {allowed}"
    with pytest.raises(UserError) as e:
        expand_pattern("MAM", 4)
    assert str(e.value) == (f"model.block_pattern='MAM' has 3 letters, which neither equals nor divides "
                            f"model.n_layer=4; allowed: {allowed}")


# ---- layers --------------------------------------------------------------------------------------

def test_block_recipe_reaches_every_layer():
    """The config's recipe, layer by layer: norm eps everywhere (qk-norm included), Mamba sizes and layer
    indices, MLP hidden size from mlp_ratio, no MLP after Mamba with mamba_mlp false."""
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_pattern="AM", d_state=8, d_conv=3, expand=3,
                      headdim=12, ngroups=2, chunk_size=5, mlp_ratio=3, mamba_mlp=False, norm_eps=0.25)
    model = HybridLM(cfg, vocab_size=TINY_VOCAB)
    attn, mamba = model.blocks[0].mixer, model.blocks[1].mixer
    norms = [model.norm_embed, model.norm_f, attn.qk_norm, model.blocks[0].norm_mixer, model.blocks[0].norm_mlp,
             model.blocks[1].norm_mixer]
    assert [n.eps for n in norms] == [0.25] * 6
    assert (attn.layer_idx, attn.n_head, attn.n_kv_head, attn.head_dim) == (0, 4, 2, 8)
    assert (mamba.layer_idx, mamba.d_state, mamba.d_conv, mamba.d_inner, mamba.headdim, mamba.ngroups,
            mamba.chunk_size, mamba.backend) == (1, 8, 3, 96, 12, 2, 5, "torch")
    assert model.blocks[0].mlp.c_fc.weight.shape == (96, 32) and model.blocks[0].mlp.c_gate is None
    assert model.blocks[1].mlp is None and model.blocks[1].norm_mlp is None
    assert HybridLM(dataclasses.replace(cfg, mamba_mlp=True), vocab_size=TINY_VOCAB).blocks[1].mlp is not None
    no_qk = HybridLM(dataclasses.replace(cfg, qk_norm=False), vocab_size=TINY_VOCAB)
    assert no_qk.blocks[0].mixer.qk_norm is None
    # mlp_ratio 1: an MLP of n_embd hidden units; 0: none.
    assert HybridLM(dataclasses.replace(cfg, mlp_ratio=1), vocab_size=TINY_VOCAB).blocks[0].mlp.c_fc.weight.shape == (32, 32)
    assert HybridLM(dataclasses.replace(cfg, mlp_ratio=0), vocab_size=TINY_VOCAB).blocks[0].mlp is None


def test_a_block_built_on_its_own_runs_mamba_on_the_torch_backend():
    from hybridchat.model.blocks import Block

    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=4, n_kv_head=2, block_pattern="M", d_state=8, headdim=16)
    block = Block("M", cfg, 0)
    assert block.mixer.backend == "torch"
    with torch.no_grad():
        assert block(torch.randn(1, 5, 32)).shape == (1, 5, 32)


def test_relu_squared_mlp_by_hand():
    """relu2: c_proj(relu(c_fc x)^2), written out with plain matrix products."""
    from hybridchat.model.blocks import MLP

    torch.manual_seed(0)
    mlp = MLP(6, 10).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    w1, w2 = mlp.c_fc.weight.detach(), mlp.c_proj.weight.detach()
    hidden = (x @ w1.T).clamp(min=0) ** 2
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), hidden @ w2.T, rtol=1e-12, atol=1e-12)
