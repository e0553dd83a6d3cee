"""GGUF import (hybridchat/infra/gguf.py), checked against an independent NumPy Llama forward.

A tiny llama GGUF is written here the way llama.cpp's converter writes one: Q/K rows permuted for
its interleaved RoPE, every accepted tensor type, a byte-level BPE vocabulary with control tokens.
The reference reads that file with gguf's own reader and runs Llama exactly as llama.cpp does
(interleaved rotary pairs on the still-permuted Q/K), so it shares no code with the importer and
catches a wrong un-permute, a swapped gate/up, a wrong RoPE base or eps, a dropped norm gain.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from omegaconf import OmegaConf
from tokenizers import pre_tokenizers

from hybridchat.core.errors import UserError
from hybridchat.infra.context import pretrained_file
from hybridchat.infra.gguf import SUPPORTED_TYPES, import_checkpoint, read_gguf
from hybridchat.model.engine import Engine
from hybridchat.training.runs import load_run

N_LAYER, D, N_HEAD, N_KV_HEAD, FFN = 2, 64, 4, 2, 96
ROPE_BASE, EPS, CONTEXT = 5000.0, 1e-5, 4096   # a base that is not our default, so a dropped one shows
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool>"]
FLOATS = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64}  # written as numpy arrays, not blocks
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "1 2", "Ġ Ġ"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Every accepted type at least once; the norms stay F32 as llama.cpp keeps them.
TYPES = {
    "token_embd": Q.Q8_0, "output": Q.F16,
    0: {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1,
        "ffn_gate": Q.BF16, "ffn_up": Q.F16, "ffn_down": Q.Q8_0},
    1: {"attn_q": Q.F32, "attn_k": Q.BF16, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
        "ffn_gate": Q.Q5_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q5_0},
}


def _vocab() -> list[str]:
    tokens = CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet())
    return tokens + [m.replace(" ", "") for m in MERGES] + USER_DEFINED


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> llama.cpp's interleaved pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, *, arch: str = "llama", pre: str = "smollm", tie: bool = True, drop: str | None = None,
               types: dict | None = None, metadata: dict | None = None) -> Path:
    """A tiny random llama GGUF; the keyword arguments break it in the ways the importer must refuse."""
    rng = np.random.default_rng(0)
    vocab = _vocab()
    w = GGUFWriter(path, arch)
    w.add_block_count(N_LAYER)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(EPS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_types([TokenType.CONTROL] * len(CONTROL) + [TokenType.NORMAL] * (len(vocab) - len(CONTROL) - 1)
                      + [TokenType.USER_DEFINED])
    w.add_token_merges(MERGES)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        w.add_string(key, value)

    def add(name: str, shape: tuple[int, ...], qtype: Q, scale: float, offset: float = 0.0) -> None:
        data = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            data = _permute(data, N_HEAD if "attn_q" in name else N_KV_HEAD)
        if name == drop:
            return
        qtype = (types or {}).get(name, qtype)
        if qtype in FLOATS:
            w.add_tensor(name, data.astype(FLOATS[qtype]))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    hd = D // N_HEAD
    add("token_embd.weight", (len(vocab), D), TYPES["token_embd"], 0.3)
    if not tie:
        add("output.weight", (len(vocab), D), TYPES["output"], D ** -0.5)
    add("output_norm.weight", (D,), Q.F32, 0.1, 1.0)
    for i in range(N_LAYER):
        t = TYPES[i]
        add(f"blk.{i}.attn_norm.weight", (D,), Q.F32, 0.1, 1.0)
        add(f"blk.{i}.attn_q.weight", (N_HEAD * hd, D), t["attn_q"], 2 * D ** -0.5)
        add(f"blk.{i}.attn_k.weight", (N_KV_HEAD * hd, D), t["attn_k"], 2 * D ** -0.5)
        add(f"blk.{i}.attn_v.weight", (N_KV_HEAD * hd, D), t["attn_v"], D ** -0.5)
        add(f"blk.{i}.attn_output.weight", (D, N_HEAD * hd), t["attn_output"], D ** -0.5)
        add(f"blk.{i}.ffn_norm.weight", (D,), Q.F32, 0.1, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (FFN, D), t["ffn_gate"], D ** -0.5)
        add(f"blk.{i}.ffn_up.weight", (FFN, D), t["ffn_up"], D ** -0.5)
        add(f"blk.{i}.ffn_down.weight", (D, FFN), t["ffn_down"], FFN ** -0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Llama as llama.cpp runs it, in float64, from the file alone (gguf's reader and dequantize)."""
    r = GGUFReader(path)

    def meta(key):
        return r.fields[key].contents()

    W = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    d, n_head, n_kv = meta("llama.embedding_length"), meta("llama.attention.head_count"), meta(
        "llama.attention.head_count_kv")
    hd, eps, base = d // n_head, meta("llama.attention.layer_norm_rms_epsilon"), meta("llama.rope.freq_base")
    T = len(ids)
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)   # (T, hd/2)
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

    def rms(x, gain):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gain

    def rope(x):  # ggml's "normal" rope: rotate the interleaved pairs (2i, 2i+1) by pos * base^(-2i/hd)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = W["token_embd.weight"][ids]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(meta("llama.block_count")):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope((h @ W[p + "attn_q.weight"].T).reshape(T, n_head, hd))
        k = rope((h @ W[p + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        att = np.empty((T, n_head, hd))
        for head in range(n_head):
            kv = head // (n_head // n_kv)  # consecutive query heads share a KV head
            s = np.where(causal, q[:, head] @ k[:, kv].T / np.sqrt(hd), -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, -1) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        gate, up = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ W[p + "ffn_down.weight"].T
    head = W.get("output.weight", W["token_embd.weight"])
    return rms(x, W["output_norm.weight"]) @ head.T


IDS = [1, 40, 77, 140, 262, 263, 120, 5, 259, 33, 90, 2, 264, 200, 17, 60]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).squeeze(0).double().numpy()


def test_fixture_covers_every_accepted_type(tiny):
    assert {t.tensor_type for t in GGUFReader(tiny).tensors} == SUPPORTED_TYPES


@pytest.mark.parametrize("tie", [True, False])
def test_imported_model_matches_reference_forward(tiny, tmp_path, tie):
    path = tiny if tie else write_gguf(tmp_path / "untied.gguf", tie=False)
    imported = read_gguf(path)
    cfg = imported.config
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["mlp_hidden"]) == (
        N_LAYER, D, N_HEAD, N_KV_HEAD, FFN)
    assert (cfg["rope_base"], cfg["norm_eps"], cfg["tie_embeddings"], cfg["vocab_size"]) == (
        ROPE_BASE, EPS, tie, len(_vocab()))
    assert (cfg["mlp"], cfg["qk_norm"], cfg["norm_weights"], cfg["embed_norm"], cfg["block_pattern"]) == (
        "swiglu", False, True, False, "all_attention")
    assert cfg["sequence_len"] == 2048  # min(context 4096, 2048)
    ours, ref = _logits(imported.model(), IDS), reference_logits(path, IDS)
    assert np.abs(ref).max() > 1.0  # logits large enough for a wrong weight to show
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_tokenizer(tiny):
    imported = read_gguf(tiny)
    tok, vocab = imported.tokenizer, _vocab()
    assert tok.vocab_size == len(vocab)
    assert [tok.token_id(t) for t in CONTROL + USER_DEFINED] == [0, 1, 2, len(vocab) - 1]
    assert imported.chat_template == CHAT_TEMPLATE
    # GPT-2 split keeps " the" whole so its merges apply; digits are split first, so the "1 2"
    # merge never fires (SmolLM2's Digits(individual_digits) pre-tokenizer).
    assert tok.encode(" the") == [vocab.index("Ġthe")]
    assert tok.encode("12") == [vocab.index("1"), vocab.index("2")]
    assert tok.encode("a<tool>b") == [vocab.index("a"), vocab.index("<tool>"), vocab.index("b")]
    for text in ["the 12 in 2024 thin", "naïve café — 東京 🙂\n\ttabs  spaces", "say <|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & {0, 1, 2}  # text spelling a control token stays text
    assert tok.decode([1, 2, 0]) == "<|im_start|><|im_end|><|endoftext|>"


def test_import_checkpoint_round_trip(tiny, tmp_path):
    imported = read_gguf(tiny)
    step = import_checkpoint(tiny, tmp_path / "imported")
    assert step == tmp_path / "imported" / "step_000000"
    run = load_run(step)
    model, tok, meta = run.model, run.tokenizer, run.meta
    assert meta["source"] == f"gguf:{tiny.name}" and meta["config"]["model"] == imported.config
    assert tok.fingerprint == imported.tokenizer.fingerprint
    assert tok.encode("the 12 <tool>") == imported.tokenizer.encode("the 12 <tool>")
    np.testing.assert_array_equal(_logits(model, IDS), _logits(imported.model(), IDS))


def _bad(path: Path, kind: str) -> Path:
    if kind == "not gguf":
        path.write_bytes(b"definitely not a GGUF file\n" * 10)
        return path
    return write_gguf(path, **{
        "architecture": dict(arch="gpt2"),
        "pre-tokenizer": dict(pre="llama-bpe"),
        "missing tensor": dict(drop="blk.1.ffn_up.weight"),
        "tensor type": dict(types={"blk.0.attn_v.weight": Q.F64}),
        "rope scaling": dict(metadata={"llama.rope.scaling.type": "linear"}),
    }[kind])


@pytest.mark.parametrize("kind, says", [
    ("not gguf", "not a readable GGUF file"),
    ("architecture", "architecture 'gpt2' is not supported"),
    ("pre-tokenizer", "tokenizer.ggml.pre='llama-bpe' is not supported (supported: ['qwen2', 'smollm'])"),
    ("missing tensor", "['blk.1.ffn_up.weight'] missing"),
    ("tensor type", "blk.0.attn_v.weight has type F64"),
    ("rope scaling", "llama.rope.scaling.type='linear' is not supported"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, kind, says):
    path = _bad(tmp_path / "bad.gguf", kind)
    with pytest.raises(UserError) as e:
        read_gguf(path)
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def smollm2_file() -> Path:
    """The real SmolLM2 GGUF (make install installs its package); a machine without it skips the test."""
    spec = compose_config(["model=smollm2_135m"]).model.pretrained
    try:
        return pretrained_file(spec)
    except UserError as e:
        pytest.skip(str(e))


def rag_from_the_tiny_file(tiny, tmp_path) -> list[str]:
    """Overrides for a smoke rag stage from the tiny GGUF file (its sizes, imported on first use)."""
    fits = {k: v for k, v in read_gguf(tiny).config.items() if k not in ("name", "sequence_len")}
    return ["debug=smoke", "model=smollm2_135m", f"paths.outputs={tmp_path}", "run_name=imported",
            *(f"model.{k}={v}" for k, v in fits.items() if v is not None), f"model.pretrained={tiny}",
            "model.sequence_len=1024", "stage=rag", "stage.source=pretrained", "stage.num_steps=2",
            "stage.eval_every=2", "stage.eval_questions=4", "stage.max_documents=2", "gpu.micro_batch=2"]


def test_stage_source_pretrained_imports_the_file_once_and_tunes_it(tiny, tmp_path):
    from hybridchat.train import run

    overrides = rag_from_the_tiny_file(tiny, tmp_path)
    run(compose_config(overrides, output_dir=tmp_path / "run1"))
    imported = tmp_path / "checkpoints" / "imported" / "pretrained" / "step_000000"
    tuned = tmp_path / "checkpoints" / "imported" / "rag" / "step_000002"
    loaded = load_run(tuned)
    model, tok, meta = loaded.model, loaded.tokenizer, loaded.meta
    assert meta["config"]["stage"]["source"] == "pretrained" and tok.fingerprint == read_gguf(tiny).tokenizer.fingerprint
    assert not np.array_equal(_logits(model, IDS), _logits(load_run(imported).model, IDS))  # it trained
    stamp = (imported / "model.safetensors").stat().st_mtime_ns
    run(compose_config(overrides + ["stage.num_steps=1", "overwrite=true"], output_dir=tmp_path / "run2"))
    assert (imported / "model.safetensors").stat().st_mtime_ns == stamp  # imported once, then reused


def test_request_match_on_an_imported_model_is_one_line(tiny, tmp_path):
    from hybridchat.train import run

    # ChatML's ids are other tokens than the ones the feature looks for: marking by them would be noise
    with pytest.raises(UserError, match=re.escape("model.request_match=true needs hybridchat's chat tokens")):
        run(compose_config(rag_from_the_tiny_file(tiny, tmp_path) + ["model.request_match=true"],
                           output_dir=tmp_path / "run"))
    assert not (tmp_path / "checkpoints" / "imported" / "rag").exists()


@pytest.mark.parametrize("overrides, says", [
    (["model=hybrid_tiny"], "model=hybrid_tiny has no model.pretrained"),
    (["model=smollm2_135m", "model.pretrained=no_such_package_xyz:model.gguf"],
     "Python package 'no_such_package_xyz' is not installed"),
    (["model=smollm2_135m", "model.pretrained=/nonexistent/model.gguf"], "no file /nonexistent/model.gguf"),
])
def test_stage_source_pretrained_without_a_usable_file_is_one_line(tmp_path, overrides, says):
    from hybridchat.train import run

    with pytest.raises(UserError, match=re.escape(says)):
        run(compose_config(["debug=smoke", f"paths.outputs={tmp_path}", "stage=rag", "stage.source=pretrained",
                            *overrides], output_dir=tmp_path / "run"))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").rglob("meta.json"))


ENGLISH = ("The cat sat on the mat and looked out of the window. It was a sunny day, and the birds were "
           "singing in the trees. After a while, the cat got up, stretched, and walked slowly into the kitchen "
           "to look for something to eat.")


def _chat_ids(tok, rendered: str) -> list[int]:
    # The rendered template spells the control tokens out; the tokenizer keeps such text as text,
    # so they are put in by id, as the chat renderer does.
    parts = re.split(r"(<\|im_start\|>|<\|im_end\|>)", rendered)
    return [i for part in parts if part for i in ([tok.token_id(part)] if part.startswith("<|im_") else
                                                  tok.encode(part))]


def test_chat_renderer_writes_the_files_own_chat_template(tiny):
    """The renderer's tokens for an imported model are the file's Jinja template, token for token."""
    jinja2 = pytest.importorskip("jinja2")
    from hybridchat.data.chat import ChatRenderer

    tok = read_gguf(tiny).tokenizer
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the 12 in"},
                    {"role": "assistant", "content": "thin"}, {"role": "user", "content": "and?"},
                    {"role": "assistant", "content": "the 2"}]
    ids, _ = ChatRenderer(tok).render(conversation)
    assert ids == _chat_ids(tok, jinja2.Template(CHAT_TEMPLATE).render(messages=conversation))


@pytest.mark.slow
def test_smollm2_135m_reads_english_and_answers(capsys):
    jinja2 = pytest.importorskip("jinja2")
    t0 = time.perf_counter()
    imported = read_gguf(smollm2_file())
    model, tok = imported.model(), imported.tokenizer
    t1 = time.perf_counter()
    # Read from the metadata, the config is conf/model/smollm2_135m.yaml's, so checkpoint.load
    # accepts the import under model=smollm2_135m (model.pretrained names the file; not recorded).
    expected = OmegaConf.to_container(compose_config(["model=smollm2_135m"]).model)
    assert {k: v for k, v in imported.config.items() if k != "pretrained"} == {
        k: v for k, v in expected.items() if k != "pretrained"}
    assert tok.encode("1234") == [tok.token_id(c) for c in "1234"]

    ids = tok.encode(ENGLISH)
    with torch.no_grad():
        loss = model(torch.tensor([ids[:-1]]), targets=torch.tensor([ids[1:]])).item()
    t2 = time.perf_counter()

    rendered = jinja2.Template(imported.chat_template).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    out = Engine(model).generate([_chat_ids(tok, rendered)], max_new_tokens=20, temperature=0,
                                 stop_tokens=[tok.token_id("<|im_end|>")])
    answer = tok.decode(out.tokens[0])
    t3 = time.perf_counter()
    with capsys.disabled():
        print(f"\nSmolLM2-135M: import {t1 - t0:.1f}s; loss {loss:.3f} nats on {len(ids)} tokens ({t2 - t1:.1f}s); "
              f"greedy {answer!r} ({t3 - t2:.1f}s)")
    assert loss < 3.0  # 2.56 as imported; 3.75 with Q/K left permuted
    assert "Paris" in answer
