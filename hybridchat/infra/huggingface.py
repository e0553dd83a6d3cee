"""Import a local Hugging Face model folder (config.json, *.safetensors, tokenizer.json) of the Llama
family into HybridLM: Llama and SmolLM/SmolLM2 (model_type llama), Qwen2 (q/k/v biases).

`read_folder` returns an ImportedModel (infra/imported.py), which `imported.write_checkpoint` makes
an ordinary checkpoint. Only files are read, nothing is downloaded, and no pickle is opened
(pytorch_model.bin can run code when loaded): safetensors only. Every config.json key that changes
what the model computes is read or checked; a value HybridLM computes differently (RoPE scaling,
another activation, sliding-window attention, biases elsewhere than q/k/v, a head size other than
hidden_size / heads) is one UserError naming the key and what is allowed, never a silent import of
a model that answers differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from hybridchat.core.errors import UserError
from hybridchat.data.chat import ChatFormat
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra.imported import (
    ImportedModel,
    chat_template_difference,
    layer_names,
    llama_config,
    llama_shapes,
)

# model_type -> the defaults transformers' config class uses for a key config.json leaves out, and
# whether q/k/v carry biases (Qwen2's always do; Llama's only with attention_bias, refused below).
FAMILIES = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "qkv_bias": False},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "qkv_bias": True},
}
# transformers' names of a layer's tensors -> ours.
LAYER = {"input_layernorm.weight": "norm_mixer.weight", "self_attn.q_proj.weight": "mixer.c_q.weight",
         "self_attn.k_proj.weight": "mixer.c_k.weight", "self_attn.v_proj.weight": "mixer.c_v.weight",
         "self_attn.q_proj.bias": "mixer.c_q.bias", "self_attn.k_proj.bias": "mixer.c_k.bias",
         "self_attn.v_proj.bias": "mixer.c_v.bias", "self_attn.o_proj.weight": "mixer.c_proj.weight",
         "post_attention_layernorm.weight": "norm_mlp.weight", "mlp.gate_proj.weight": "mlp.c_gate.weight",
         "mlp.up_proj.weight": "mlp.c_fc.weight", "mlp.down_proj.weight": "mlp.c_proj.weight"}
GLOBAL = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm_f.weight",
          "lm_head.weight": "lm_head.weight"}


class _Folder:
    """The folder plus the name every error message starts with."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, problem: str) -> UserError:
        return UserError(f"Hugging Face folder {self.path}: {problem}")

    def json(self, name: str, required: bool = True) -> dict[str, Any]:
        file = self.path / name
        if not file.is_file():
            if required:
                raise self.error(f"has no {name}")
            return {}
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise self.error(f"{name} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        if not isinstance(data, dict):
            raise self.error(f"{name} is not a JSON object")
        return data


def _rope_theta(f: _Folder, c: dict[str, Any]) -> float:
    # transformers 5 writes rope_parameters {rope_type, rope_theta}; earlier ones rope_theta and
    # rope_scaling (null, or {type|rope_type, factor, ...}).
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
        raise f.error(f"config.json {key} has rope_type={kind!r}; only plain RoPE ('default', or no scaling) is "
                      f"supported")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _config(f: _Folder, c: dict[str, Any], tie: bool) -> dict[str, Any]:
    kind = c.get("model_type")
    if kind not in FAMILIES:
        raise f.error(f"config.json model_type={kind!r} is not supported (supported: {', '.join(FAMILIES)})")
    family = FAMILIES[kind]

    def refuse_unless(key: str, allowed: Any, why: str) -> None:
        if c.get(key, allowed) != allowed:
            raise f.error(f"config.json {key}={c[key]!r} is not supported (only {allowed!r}: {why})")

    refuse_unless("hidden_act", "silu", "the SwiGLU MLP")
    refuse_unless("attention_bias", False, "Llama's attention_bias puts a bias on o_proj too, which HybridLM lacks")
    refuse_unless("mlp_bias", False, "HybridLM's MLP has no biases")
    refuse_unless("use_sliding_window", False, "HybridLM attends to the whole context")
    if any(t != "full_attention" for t in c.get("layer_types") or []):
        raise f.error(f"config.json layer_types={c['layer_types']!r} is not supported (only 'full_attention')")
    try:
        n_embd, n_head, n_layer = int(c["hidden_size"]), int(c["num_attention_heads"]), int(c["num_hidden_layers"])
        mlp_hidden, vocab_size = int(c["intermediate_size"]), int(c["vocab_size"])
    except KeyError as e:
        raise f.error(f"config.json has no {e.args[0]}") from None
    if (head_dim := c.get("head_dim")) is not None and head_dim * n_head != n_embd:
        raise f.error(f"config.json head_dim={head_dim} is not supported (only hidden_size / num_attention_heads "
                      f"= {n_embd // n_head}: HybridLM's heads split the model width)")
    try:
        return llama_config(
            name=f.path.name.lower(), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            n_kv_head=int(c.get("num_key_value_heads") or n_head), mlp_hidden=mlp_hidden,
            rope_base=_rope_theta(f, c), norm_eps=float(c.get("rms_norm_eps", family["rms_norm_eps"])),
            context=int(c.get("max_position_embeddings", family["max_position_embeddings"])),
            vocab_size=vocab_size, tie=tie, qkv_bias=family["qkv_bias"])
    except UserError as e:
        raise f.error(f"config.json's sizes do not fit HybridLM: {e}") from None


def _weight_files(f: _Folder) -> list[Path]:
    """The safetensors files: the shards an index names, else model.safetensors, else every one."""
    index = f.json("model.safetensors.index.json", required=False)
    if index:
        files = sorted({f.path / name for name in (index.get("weight_map") or {}).values()})
        if missing := [p.name for p in files if not p.is_file()]:
            raise f.error(f"model.safetensors.index.json names shard(s) {missing[:3]} that are not there")
    elif (f.path / "model.safetensors").is_file():
        files = [f.path / "model.safetensors"]
    else:
        files = sorted(f.path.glob("*.safetensors"))
    if not files:
        raise f.error("has no *.safetensors weights (pickled pytorch_model.bin is not read: loading it can run code)")
    return files


def _tensors(f: _Folder, files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as shard:
                for name in shard.keys():
                    if not name.endswith(".rotary_emb.inv_freq"):  # older saves kept RoPE's table: derived
                        tensors[name] = shard.get_tensor(name)
        except Exception as e:  # safetensors raises SafetensorError / OSError on foreign or truncated files
            raise f.error(f"{file.name} is not readable safetensors ({' '.join(str(e).split())[:200]})") from None
    return tensors


def _tokenizer(f: _Folder, vocab_size: int) -> Tokenizer:
    file = f.path / "tokenizer.json"
    if not file.is_file():
        raise f.error("has no tokenizer.json (a slow tokenizer alone, tokenizer.model or vocab.json, is not read)")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception on bad JSON
        raise f.error(f"tokenizer.json is unreadable ({' '.join(str(e).split())[:200]})") from None
    # Bits-per-byte and streaming read a token's text as bytes, one character each: byte-level BPE.
    decoder = (json.loads(hf.to_str()).get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise f.error(f"tokenizer.json has decoder {decoder!r}; only byte-level BPE tokenizers ('ByteLevel': "
                      f"GPT-2, SmolLM2, Qwen2) are supported")
    try:
        tokenizer = Tokenizer(hf)
        ChatFormat.for_tokenizer(tokenizer)  # the chat renderer must know its turns
    except (UserError, ValueError) as e:
        raise f.error(f"tokenizer.json: {e}") from None
    if tokenizer.vocab_size > vocab_size:
        raise f.error(f"tokenizer.json has {tokenizer.vocab_size} tokens, more than config.json vocab_size={vocab_size}")
    return tokenizer


def _chat_template(f: _Folder) -> str | None:
    # transformers >= 4.43 saves it as chat_template.jinja; earlier in tokenizer_config.json, as a
    # string or a list of named templates ("default" is the one apply_chat_template uses).
    if (f.path / "chat_template.jinja").is_file():
        return (f.path / "chat_template.jinja").read_text(encoding="utf-8")
    template = f.json("tokenizer_config.json", required=False).get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def _checked_chat_template(f: _Folder, tokenizer: Tokenizer) -> str | None:
    template = _chat_template(f)
    if problem := chat_template_difference(tokenizer, template):
        raise f.error(f"its chat template is not the ChatML hybridchat renders: {problem}")
    return template


def read_folder(path: str | Path) -> ImportedModel:
    """Config, float32 weights and tokenizer of a Hugging Face folder, or a UserError saying why not."""
    f = _Folder(Path(path))
    if not f.path.is_dir():
        raise f.error("is not a folder")
    c = f.json("config.json")
    # config.json says whether the head is tied; a saved lm_head.weight must then be the embedding.
    tie = bool(c.get("tie_word_embeddings", False))
    config = _config(f, c, tie)  # before the weights: a model that is not supported is told so first
    tensors = _tensors(f, _weight_files(f))
    tokenizer = _tokenizer(f, config["vocab_size"])
    shapes = llama_shapes(config)
    names = {theirs: ours for theirs, ours in layer_names(LAYER, config["n_layer"], "model.layers.{i}.",
                                                          GLOBAL).items() if ours in shapes}
    if missing := [n for n in names if n not in tensors]:
        raise f.error(f"tensor(s) {missing[:3]} missing ({len(missing)} in all)")
    if tie and "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], tensors[
            "model.embed_tokens.weight"]):
        # transformers 4 ties them anyway (the saved head ignored), transformers 5 keeps both: which
        # model this is depends on the version, so it is not guessed.
        raise f.error("config.json tie_word_embeddings=true, but the saved lm_head.weight differs from "
                      "model.embed_tokens.weight (transformers 4 would tie them, 5 keeps both): set "
                      "tie_word_embeddings to what the model was trained with")
    ignored = {"lm_head.weight"} if tie else set()  # a copy of the embedding, as some saves keep
    if extra := [n for n in tensors if n not in names and n not in ignored]:
        raise f.error(f"tensor(s) {extra[:3]} not supported: HybridLM has no place for them")
    state = {}
    for theirs, ours in names.items():
        w = tensors[theirs]
        if tuple(w.shape) != shapes[ours]:
            raise f.error(f"tensor {theirs} has shape {tuple(w.shape)}, config.json implies {shapes[ours]}")
        state[ours] = w.to(torch.float32).contiguous()
    return ImportedModel(config, state, tokenizer, _checked_chat_template(f, tokenizer), f"huggingface:{f.path.name}")
