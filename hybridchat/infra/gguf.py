"""Import a Llama-family GGUF checkpoint (llama.cpp's format: llama, e.g. SmolLM2; qwen2) into HybridLM.

`read_gguf` turns the file into an ImportedModel (infra/imported.py: a complete model config, a
float32 state dict in HybridLM's names and the tokenizer); `import_checkpoint` writes that as an
ordinary step folder, so training stages, `runs.load_run`, chat and evaluation take an imported
model like one trained here.

Everything is read from the file's metadata, nothing assumed from the model's name. What HybridLM
cannot compute the same way (another architecture, RoPE scaling, partial rotary, extra tensors,
another pre-tokenizer) is refused with a one-line UserError rather than imported subtly wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra.imported import (
    ImportedModel,
    chat_template_difference,
    layer_names,
    llama_config,
    llama_shapes,
    write_checkpoint,
)

# Tensor types gguf.quants can both write and read back, so tests/test_gguf.py covers each one.
# K-quants (Q4_K_M files) use 256-value blocks a small test model cannot hold: not accepted yet.
SUPPORTED_TYPES = {GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                                            "Q5_1")}


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # SmolLM2's tokenizer.json: every digit alone, then GPT-2's regex split and byte mapping
    # (llama.cpp's "smollm" pre-type: \p{N} first, then the GPT-2 pattern).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# Qwen2's tokenizer.json (llama.cpp's "qwen2" pre-type): one digit at a time, letters with one
# leading non-letter, then byte mapping without GPT-2's own split.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre names the original tokenizer's pre-tokenization; the vocabulary and merges
# are only right with the same one, so an unknown name is refused, not guessed.
PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer, "qwen2": _qwen2_pre_tokenizer}
# Qwen2's tokenizer.json composes text to NFC first; a decomposed "é" would split otherwise.
NORMALIZERS = {"qwen2": normalizers.NFC}
# general.architecture -> whether convert_hf_to_gguf permuted Q/K rows for llama.cpp's interleaved
# RoPE (llama does; qwen2 runs NEOX-style rotate-half, as HF does, and is left as is), and q/k/v biases.
ARCHITECTURES = {"llama": {"permuted": True, "qkv_bias": False}, "qwen2": {"permuted": False, "qkv_bias": True}}


class _File:
    """The reader plus the file name every error message starts with."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # gguf raises ValueError / IndexError / OSError on foreign or truncated files
            raise self.error(f"is not a readable GGUF file ({type(e).__name__}: {' '.join(str(e).split())[:200]})")

    def error(self, problem: str) -> UserError:
        return UserError(f"GGUF file {self.path}: {problem}")

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise self.error(f"metadata key {key} is missing")
            return default
        return field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute. llama.cpp rotates interleaved pairs (2i, 2i+1)
    of each head; our rotary (rotate_half, as in HF) pairs (i, i + head_dim/2). The converter moved
    row i + j*head_dim/2 of a head to row 2i + j; this moves it back."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tokenizer(f: _File) -> Tokenizer:
    if (kind := f.get("tokenizer.ggml.model")) != "gpt2":
        raise f.error(f"tokenizer.ggml.model={kind!r} is not supported (only 'gpt2': byte-level BPE)")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise f.error(f"tokenizer.ggml.pre={pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})")
    tokens = f.get("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        raise f.error("tokenizer.ggml.tokens has duplicates or does not match tokenizer.ggml.token_type")
    # Merges are "left right"; byte-level tokens never hold a real space (it is Ġ), so one split is exact.
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges")]
    # No unk token and no byte fallback: like the original BPE, a byte outside the vocabulary is dropped.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
    if pre in NORMALIZERS:
        hf.normalizer = NORMALIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    # CONTROL tokens (<|im_start|>, <|endoftext|>, ...) are the original's special added tokens;
    # USER_DEFINED ones its plain added tokens (stored as text, matched before BPE). Both keep their ids.
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types) if k == TokenType.CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, k in zip(tokens, types) if k == TokenType.USER_DEFINED])
    return Tokenizer(hf)


def _settings(f: _File, arch: str, n_vocab: int, tie: bool) -> dict[str, Any]:
    def number(key: str, default: Any = ...) -> Any:
        value = f.get(f"{arch}.{key}", default)
        # float32 metadata (1e-5 reads as 9.99999974e-06): keep the shortest decimal that rounds back.
        return float(str(np.float32(value))) if isinstance(value, float) else value

    n_embd, n_head = number("embedding_length"), number("attention.head_count")
    head_dim = n_embd // n_head
    if (rotary := number("rope.dimension_count", head_dim)) != head_dim:
        raise f.error(f"{arch}.rope.dimension_count={rotary} (partial rotary) is not "
                      f"supported: HybridLM rotates the whole head of {head_dim}")
    if (scaling := f.get(f"{arch}.rope.scaling.type", "none")) != "none":
        raise f.error(f"{arch}.rope.scaling.type={scaling!r} is not supported (only plain RoPE)")
    basename, size = f.get("general.basename", None), f.get("general.size_label", None)
    try:
        # name: "smollm2_135m", like conf/model/smollm2_135m.yaml; the file's stem when the metadata is silent.
        return llama_config(
            name=f"{basename}_{size}".lower() if basename and size else f.path.name.split(".")[0],
            n_layer=number("block_count"), n_embd=n_embd, n_head=n_head,
            n_kv_head=number("attention.head_count_kv", n_head), mlp_hidden=number("feed_forward_length"),
            rope_base=number("rope.freq_base", 10000.0), norm_eps=number("attention.layer_norm_rms_epsilon"),
            context=number("context_length"), vocab_size=n_vocab, tie=tie, qkv_bias=ARCHITECTURES[arch]["qkv_bias"])
    except UserError as e:
        raise f.error(f"its sizes do not fit HybridLM: {e}") from None


# GGUF's names of a layer's tensors -> ours (convert_hf_to_gguf's tensor map; biases: qwen2's).
LAYER = {"attn_norm.weight": "norm_mixer.weight", "attn_q.weight": "mixer.c_q.weight",
         "attn_k.weight": "mixer.c_k.weight", "attn_v.weight": "mixer.c_v.weight",
         "attn_q.bias": "mixer.c_q.bias", "attn_k.bias": "mixer.c_k.bias", "attn_v.bias": "mixer.c_v.bias",
         "attn_output.weight": "mixer.c_proj.weight", "ffn_norm.weight": "norm_mlp.weight",
         "ffn_gate.weight": "mlp.c_gate.weight", "ffn_up.weight": "mlp.c_fc.weight",
         "ffn_down.weight": "mlp.c_proj.weight"}
GLOBAL = {"token_embd.weight": "wte.weight", "output_norm.weight": "norm_f.weight", "output.weight": "lm_head.weight"}


def _expected(cfg: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (HybridLM name, shape as dequantized: (out, in) for matrices)."""
    shapes = llama_shapes(cfg)
    return {theirs: (ours, shapes[ours]) for theirs, ours in layer_names(LAYER, cfg["n_layer"], "blk.{i}.",
                                                                         GLOBAL).items() if ours in shapes}


def read_gguf(path: str | Path) -> ImportedModel:
    """Config, dequantized weights and tokenizer of a llama or qwen2 GGUF file, or a UserError saying why not."""
    f = _File(Path(path))
    if (arch := f.get("general.architecture")) not in ARCHITECTURES:
        raise f.error(f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    tokenizer = _tokenizer(f)
    template = f.get("tokenizer.chat_template", None)
    if problem := chat_template_difference(tokenizer, template):
        raise f.error(f"its chat template is not the ChatML hybridchat renders: {problem}")
    tensors = {t.name: t for t in f.reader.tensors}
    tie = "output.weight" not in tensors  # no separate output matrix: the head reuses the embedding
    config = _settings(f, arch, tokenizer.vocab_size, tie)
    expected = _expected(config)
    if missing := [n for n in expected if n not in tensors]:
        raise f.error(f"tensor(s) {missing[:3]} missing ({len(missing)} in all)")
    if extra := [n for n in tensors if n not in expected]:
        raise f.error(f"tensor(s) {extra[:3]} not supported: HybridLM has no place for them")
    state: dict[str, torch.Tensor] = {}
    for name, (ours, shape) in expected.items():
        t = tensors[name]
        if t.tensor_type not in SUPPORTED_TYPES:
            raise f.error(f"tensor {name} has type {t.tensor_type.name}; supported: "
                          f"{sorted(q.name for q in SUPPORTED_TYPES)}")
        w = dequantize(t.data, t.tensor_type)
        if w.shape != shape:
            raise f.error(f"tensor {name} has shape {w.shape}, the metadata implies {shape}")
        if ARCHITECTURES[arch]["permuted"] and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, config["n_head"] if "attn_q" in name else config["n_kv_head"])
        state[ours] = torch.tensor(np.asarray(w, dtype=np.float32))  # a copy: the reader's data is a memmap
    return ImportedModel(config, state, tokenizer, template, f"gguf:{f.path.name}")


def import_checkpoint(gguf_path: str | Path, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the GGUF model as step 0 of the stage folder `directory` (imported.write_checkpoint)."""
    return write_checkpoint(read_gguf(gguf_path), directory, overwrite)
