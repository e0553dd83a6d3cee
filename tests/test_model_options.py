"""Model options for Llama-family weights (SwiGLU, learned RMSNorm gains and eps, no QK-norm, no
embedding norm, tied embeddings): logits equal an independent implementation (transformers' Llama)
with and without our KV cache; the defaults keep today's model and its checkpoints; tied weights
train once and survive a checkpoint round trip; model=smollm2_135m is SmolLM2-135M's shapes."""

import dataclasses
import json

import pytest
import torch
from conftest import TINY_VOCAB, compose_config, train_steps
from safetensors import safe_open

from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra import checkpoint
from hybridchat.infra.config import StageConfig
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.train import typed_config
from hybridchat.training.loop import build_optimizers
from hybridchat.training.runs import load_run

VOCAB = 100
LLAMA = ModelConfig(name="llama_tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_pattern="all_attention",
                    mlp="swiglu", mlp_hidden=96, qk_norm=False, norm_weights=True, norm_eps=1e-5, embed_norm=False,
                    tie_embeddings=True, attn_rope=True, rope_base=10000.0, sequence_len=64)
# Our name -> transformers' name, per layer.
LAYER_NAMES = {"norm_mixer": "input_layernorm", "mixer.c_q": "self_attn.q_proj", "mixer.c_k": "self_attn.k_proj",
               "mixer.c_v": "self_attn.v_proj", "mixer.c_proj": "self_attn.o_proj",
               "norm_mlp": "post_attention_layernorm", "mlp.c_gate": "mlp.gate_proj", "mlp.c_fc": "mlp.up_proj",
               "mlp.c_proj": "mlp.down_proj"}
# HybridLM(ModelConfig(), vocab_size=100).state_dict() keys (pattern MAMA) before these options existed.
DEFAULT_KEYS = [
    "wte.weight",
    "blocks.0.mixer.dt_bias", "blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.in_proj.weight",
    "blocks.0.mixer.conv1d.weight", "blocks.0.mixer.conv1d.bias", "blocks.0.mixer.norm.weight",
    "blocks.0.mixer.out_proj.weight", "blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_proj.weight",
    "blocks.1.mixer.c_q.weight", "blocks.1.mixer.c_k.weight", "blocks.1.mixer.c_v.weight",
    "blocks.1.mixer.c_proj.weight", "blocks.1.mlp.c_fc.weight", "blocks.1.mlp.c_proj.weight",
    "blocks.2.mixer.dt_bias", "blocks.2.mixer.A_log", "blocks.2.mixer.D", "blocks.2.mixer.in_proj.weight",
    "blocks.2.mixer.conv1d.weight", "blocks.2.mixer.conv1d.bias", "blocks.2.mixer.norm.weight",
    "blocks.2.mixer.out_proj.weight", "blocks.2.mlp.c_fc.weight", "blocks.2.mlp.c_proj.weight",
    "blocks.3.mixer.c_q.weight", "blocks.3.mixer.c_k.weight", "blocks.3.mixer.c_v.weight",
    "blocks.3.mixer.c_proj.weight", "blocks.3.mlp.c_fc.weight", "blocks.3.mlp.c_proj.weight",
    "lm_head.weight",
]


def llama_pair(seed: int = 0):
    """A random transformers LlamaForCausalLM and a HybridLM holding the same weights."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=LLAMA.n_embd, intermediate_size=LLAMA.mlp_hidden,
        num_hidden_layers=LLAMA.n_layer, num_attention_heads=LLAMA.n_head, num_key_value_heads=LLAMA.n_kv_head,
        rope_theta=LLAMA.rope_base, rms_norm_eps=LLAMA.norm_eps, tie_word_embeddings=True,
        max_position_embeddings=LLAMA.sequence_len, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        # Random gains too: their init of 1 would hide a dropped gain. Matrices at ~1/sqrt(fan_in)
        # so that attention is far from uniform and every path matters; the (tied) embedding small
        # enough that logits stay O(1-10), where float32 rounding stays below the tolerance.
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.25 if "embed" in name else p.shape[1] ** -0.5))
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    names = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    for i in range(LLAMA.n_layer):
        names.update({f"blocks.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                      for ours, theirs in LAYER_NAMES.items()})
    ours = HybridLM(LLAMA, vocab_size=VOCAB).eval()
    hf_weights = hf.state_dict()
    ours.load_state_dict({k: hf_weights[v] for k, v in names.items()})  # strict: no key left over on our side
    return hf, ours


def test_logits_equal_transformers_llama():
    hf, ours = llama_pair()
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)
    assert want.std() > 1  # a model that does something, not near-constant logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_transformers_llama():
    """Prefill, a chunked prefill on top of the cache, then one token at a time: every position's
    logits equal transformers' full forward (RoPE offsets, GQA over the cache, tied head)."""
    hf, ours = llama_pair(seed=1)
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(idx).logits
        cache = ours.allocate_cache(2, 40)
        parts = [ours(idx[:, :17], cache=cache), ours(idx[:, 17:25], cache=cache)]
        parts += [ours(idx[:, t:t + 1], cache=cache) for t in range(25, 40)]
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-5, atol=1e-5)


def test_defaults_keep_the_state_dict_keys():
    """Checkpoints written before the options existed must still load: same keys, same order."""
    assert list(HybridLM(ModelConfig(), vocab_size=VOCAB).state_dict()) == DEFAULT_KEYS


def test_option_names_in_the_state_dict():
    keys = set(HybridLM(dataclasses.replace(LLAMA, block_pattern="MA"), vocab_size=VOCAB).state_dict())
    for i in (0, 1):  # Mamba blocks take the block's norms and MLP like attention blocks
        assert {f"blocks.{i}.norm_mixer.weight", f"blocks.{i}.norm_mlp.weight", f"blocks.{i}.mlp.c_gate.weight",
                f"blocks.{i}.mlp.c_fc.weight", f"blocks.{i}.mlp.c_proj.weight"} <= keys
    assert "norm_f.weight" in keys and "lm_head.weight" not in keys


@pytest.mark.parametrize("override,message", [
    ({"mlp": "geglu"}, "model.mlp='geglu' is not one of ['relu2', 'swiglu']"),
    ({"mlp_hidden": 0}, "model.mlp_hidden must be > 0 or null (got 0)"),
])
def test_bad_mlp_option_is_one_clear_error(override, message):
    with pytest.raises(UserError) as e:
        HybridLM(dataclasses.replace(LLAMA, **override), vocab_size=VOCAB)
    assert str(e.value) == message


def test_mlp_hidden_and_no_mlp():
    model = HybridLM(dataclasses.replace(LLAMA, mlp_hidden=None, mlp_ratio=3), vocab_size=VOCAB)
    assert model.blocks[0].mlp.c_gate.weight.shape == (3 * LLAMA.n_embd, LLAMA.n_embd)
    model = HybridLM(dataclasses.replace(LLAMA, mlp_ratio=0), vocab_size=VOCAB)
    assert model.blocks[0].mlp is None and model.blocks[0].norm_mlp is None


def test_tied_embeddings_train_once_at_the_embedding_lr():
    model = HybridLM(dataclasses.replace(LLAMA, block_pattern="MA", d_state=16, headdim=16, chunk_size=8),
                     vocab_size=VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()  # sets every parameter: gains, the SwiGLU gate and the tied matrix too
    assert all(p.isfinite().all() for p in model.parameters())
    assert all(torch.equal(n.weight, torch.ones(LLAMA.n_embd)) for n in
               (model.norm_f, model.blocks[0].norm_mixer, model.blocks[1].norm_mlp))
    gate, up = model.blocks[1].mlp.c_gate.weight, model.blocks[1].mlp.c_fc.weight
    assert gate.std().item() == pytest.approx(up.std().item(), rel=0.1) and not torch.equal(gate, up)
    groups = model.param_groups()
    grouped = [id(p) for group in groups.values() for p in group]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert groups["unembedding"] == [] and groups["embedding"] == [model.wte.weight]

    stage = StageConfig(embedding_lr=0.01, unembedding_lr=0.5, scalar_lr=0.01)
    optimizers = build_optimizers(model, stage)
    assert [g["lr"] for g in optimizers[1].param_groups] == [0.01, 0.01]  # embedding, scalar: no empty group
    tokens = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    before = model.wte.weight.detach().clone()

    def check_first_step(step: int) -> None:
        if step == 0:  # Adam's first step moves an entry by exactly its lr: the embedding's, not the head's
            assert (model.wte.weight - before).abs().max().item() == pytest.approx(0.01, rel=1e-4)

    losses = train_steps(model, optimizers, tokens, 8, after_step=check_first_step)
    assert losses[-1] < losses[0]

    untied = HybridLM(dataclasses.replace(model.config, tie_embeddings=False), vocab_size=VOCAB)
    assert untied.num_params() == model.num_params() + VOCAB * LLAMA.n_embd
    assert untied.flops_per_token() == model.flops_per_token()  # the head's matmul counts either way


def test_tied_checkpoint_round_trip(tmp_path):
    """safetensors refuses two names for one tensor: the tied matrix is saved once, as wte.weight,
    and load_run rebuilds the model (still tied) and its optimizer state from the step folder."""
    model = HybridLM(LLAMA, vocab_size=VOCAB)
    model.init_weights()
    optimizers = build_optimizers(model, StageConfig())
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    tokenizer = Tokenizer.train(["some text"], 300)
    meta = {"config": {"model": dataclasses.asdict(LLAMA)}, "tokenizer": tokenizer.fingerprint}
    path = checkpoint.save(tmp_path, 1, model, optimizers, meta, keep=1, tokenizer=tokenizer)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict()) and "lm_head.weight" not in f.keys()

    loaded = load_run(path).model
    assert loaded.config == LLAMA and loaded.lm_head is None
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)

    again = build_optimizers(loaded, StageConfig())
    checkpoint.load(path, loaded, again, tokenizer.fingerprint)
    saved_state, loaded_state = optimizers[1].state_dict()["state"], again[1].state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys()
    assert torch.equal(saved_state[0]["exp_avg"], loaded_state[0]["exp_avg"])  # wte's moments

    with pytest.raises(UserError, match="qk_norm: checkpoint False vs config True"):
        checkpoint.load(path, HybridLM(dataclasses.replace(LLAMA, qk_norm=True), vocab_size=VOCAB))


def test_checkpoint_from_before_the_options_loads(tmp_path):
    """meta.json architecture without the new keys means the defaults: such a model loads, another refuses."""
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, block_pattern="all_attention", sequence_len=16)
    model = HybridLM(cfg, vocab_size=VOCAB)
    model.init_weights()
    path = checkpoint.save(tmp_path, 1, model, [], {}, keep=1, tokenizer=Tokenizer.train(["some text"], 300))
    meta = json.loads((path / "meta.json").read_text())
    for key in ("mlp", "mlp_hidden", "qk_norm", "norm_weights", "norm_eps", "embed_norm", "tie_embeddings"):
        del meta["architecture"][key]
    (path / "meta.json").write_text(json.dumps(meta))
    checkpoint.load(path, HybridLM(cfg, vocab_size=VOCAB))
    with pytest.raises(UserError, match="embed_norm: checkpoint True vs config False"):
        checkpoint.load(path, HybridLM(dataclasses.replace(cfg, embed_norm=False), vocab_size=VOCAB))


def test_smollm2_135m_preset_has_smollm2_shapes():
    """Every tensor of transformers' SmolLM2-135M config (built on the meta device: shapes only)
    has its counterpart of the same shape, and none is left over."""
    transformers = pytest.importorskip("transformers")
    cfg = typed_config(compose_config(["model=smollm2_135m"]))[0].model
    with torch.device("meta"):
        ours = HybridLM(cfg, vocab_size=cfg.vocab_size)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
            max_position_embeddings=8192))
    assert (cfg.rope_base, cfg.norm_eps, cfg.qk_norm, cfg.embed_norm) == (100000.0, 1e-5, False, False)
    theirs = {k: v.shape for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied: embed_tokens
    mapped = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm_f.weight"}
    for i in range(30):
        mapped.update({f"model.layers.{i}.{t}.weight": f"blocks.{i}.{o}.weight" for o, t in LAYER_NAMES.items()})
    assert {mapped[k]: s for k, s in theirs.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert ours.num_params() == 134_515_008


def test_untied_head_logits_equal_transformers_llama():
    """Llama with its own lm_head (tie_word_embeddings=False): our lm_head, not the embedding,
    makes the logits."""
    transformers = pytest.importorskip("transformers")

    cfg = dataclasses.replace(LLAMA, n_layer=1, tie_embeddings=False)
    hf_config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=1,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, rope_theta=cfg.rope_base,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, max_position_embeddings=cfg.sequence_len,
        attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) * p.shape[1] ** -0.5)
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight
    names = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    names.update({f"blocks.0.{ours}.weight": f"model.layers.0.{theirs}.weight" for ours, theirs in LAYER_NAMES.items()})
    ours = HybridLM(cfg, vocab_size=TINY_VOCAB).eval()
    weights = hf.state_dict()
    ours.load_state_dict({k: weights[v] for k, v in names.items()})
    idx = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
