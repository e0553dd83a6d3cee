"""A pretrained Llama-family model read from another format, and the one way it becomes a checkpoint.

The readers (infra/gguf.py for llama.cpp's GGUF, infra/huggingface.py for a Hugging Face folder of
safetensors) each turn their file's names and settings into an ImportedModel: a complete model
config, a float32 state dict in HybridLM's names and the tokenizer. What the Llama family is in
HybridLM's terms (its config, its tensors and their shapes) lives here once, so the two formats
cannot drift apart; `write_checkpoint` makes an ordinary step folder of it, so training stages,
`runs.load_run`, chat and evaluation take an imported model like one trained here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hybridchat.core.errors import UserError
from hybridchat.data.chat import ChatRenderer
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra import checkpoint
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM, check_sizes

# The stage folder an imported model is written to: stage.source=pretrained reads it, and
# chat/evaluate read it with checkpoint_stage=pretrained.
PRETRAINED = "pretrained"


@dataclass
class ImportedModel:
    config: dict[str, Any]                 # every ModelConfig field: ModelConfig(**config) rebuilds it
    state_dict: dict[str, torch.Tensor]    # HybridLM names, float32, Q/K in rotate-half order
    tokenizer: Tokenizer
    chat_template: Optional[str]           # the original's Jinja chat template, kept in meta.json
    source: str                            # what it was read from, kept in meta.json ("gguf:file.gguf")

    def model(self) -> HybridLM:
        """The HybridLM, in eval mode, whose parameters ARE the state dict's tensors (not copies:
        copying or random-initialising 135M floats costs seconds on a small CPU)."""
        with torch.device("meta"):
            model = HybridLM(ModelConfig(**self.config), self.config["vocab_size"])
        model.load_state_dict(self.state_dict, assign=True)  # the reader checked names and shapes
        return model.eval()


def llama_config(*, name: str, n_layer: int, n_embd: int, n_head: int, n_kv_head: int, mlp_hidden: int,
                 rope_base: float, norm_eps: float, context: int, vocab_size: int, tie: bool,
                 qkv_bias: bool = False) -> dict[str, Any]:
    """The ModelConfig (as a dict) of a Llama-family model with these settings, checked for sizes
    HybridLM cannot hold (one UserError naming the model.* key)."""
    head_dim = n_embd // max(n_head, 1)
    config = ModelConfig(
        name=name, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, block_pattern="all_attention",
        mlp="swiglu", mlp_hidden=mlp_hidden, attn_rope=True, rope_base=rope_base, qk_norm=False, qkv_bias=qkv_bias,
        norm_weights=True, norm_eps=norm_eps, embed_norm=False, tie_embeddings=tie,
        # The trained context can be long (8192); training windows here default to at most 2048.
        sequence_len=min(context, 2048), vocab_size=vocab_size,
        # Unused by all-attention blocks: the Mamba-2 shape an attention -> Mamba conversion
        # (stage=distill) needs: one head of head_dim per attention head, d_state = head_dim, B and C
        # per head (hybridchat.model.convert), as conf/model/smollm2_135m.yaml sets them.
        expand=max(n_head * head_dim // max(n_embd, 1), 1), headdim=head_dim, d_state=head_dim, ngroups=n_head)
    check_sizes(config)
    return dataclasses.asdict(config)


def llama_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HybridLM name -> shape (out, in for matrices) of every tensor such a model has."""
    d, hd, v, ffn = cfg["n_embd"], cfg["n_embd"] // cfg["n_head"], cfg["vocab_size"], cfg["mlp_hidden"]
    q, kv = cfg["n_head"] * hd, cfg["n_kv_head"] * hd
    shapes = {"wte.weight": (v, d), "norm_f.weight": (d,)}
    if not cfg["tie_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        shapes |= {b + name: shape for name, shape in [
            ("norm_mixer.weight", (d,)), ("mixer.c_q.weight", (q, d)), ("mixer.c_k.weight", (kv, d)),
            ("mixer.c_v.weight", (kv, d)), ("mixer.c_proj.weight", (d, q)), ("norm_mlp.weight", (d,)),
            ("mlp.c_gate.weight", (ffn, d)), ("mlp.c_fc.weight", (ffn, d)), ("mlp.c_proj.weight", (d, ffn))]}
        if cfg["qkv_bias"]:
            shapes |= {b + "mixer.c_q.bias": (q,), b + "mixer.c_k.bias": (kv,), b + "mixer.c_v.bias": (kv,)}
    return shapes


def layer_names(table: dict[str, str], n_layer: int, theirs: str, global_names: dict[str, str]) -> dict[str, str]:
    """A format's tensor name -> ours, from its per-layer table (`theirs` a prefix with {i}, e.g.
    "blk.{i}.") and its names outside the layers."""
    names = dict(global_names)
    for i in range(n_layer):
        names |= {theirs.format(i=i) + t: f"blocks.{i}.{o}" for t, o in table.items()}
    return names


# A conversation every chat template must render as hybridchat's renderer does (a system message
# given, so a template's default one does not come in).
PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"},
         {"role": "assistant", "content": "Here [1]."}, {"role": "user", "content": "And you?"}]


def chat_template_difference(tokenizer: Tokenizer, template: str | None) -> str | None:
    """How the model's own chat template renders a conversation otherwise than hybridchat's renderer
    (which writes ChatML for a model with <|im_start|>), None where it renders the same text, or
    where there is no template to compare. A model prompted in a format it was not trained on
    answers worse, silently; so the readers refuse it with this as the reason."""
    if template is None:
        return None
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # torch requires jinja2: only a stripped environment lacks it
        return None

    def raise_exception(message: str):
        raise TemplateError(message)

    # transformers' apply_chat_template environment: sandboxed, trim_blocks and lstrip_blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        renderer = ChatRenderer(tokenizer)
    except ValueError as e:  # neither ChatML's tokens nor ours: nothing here could render its chats
        return str(e)
    for messages, generation, ours in [(PROBE[:3], False, renderer.render(PROBE[:3])[0]),
                                       (PROBE, True, renderer.prompt(PROBE))]:
        try:
            theirs = env.from_string(template).render(messages=messages, add_generation_prompt=generation,
                                                      bos_token="", eos_token="")
        except Exception as e:  # jinja2 raises TemplateError subclasses, the template itself anything
            return f"it does not render ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        text = tokenizer.decode(ours)
        if theirs != text:
            at = next((i for i, (a, b) in enumerate(zip(theirs, text)) if a != b), min(len(theirs), len(text)))
            return (f"it renders {theirs[max(at - 20, 0):at + 20]!r} where hybridchat's ChatML renderer writes "
                    f"{text[max(at - 20, 0):at + 20]!r}")
    return None


def write_checkpoint(imported: ImportedModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the model as step 0 of the stage folder `directory`; returns the step folder, which
    `runs.load_run` (and stage.source) reads like any other. A folder that already holds checkpoints
    is refused unless overwrite: then the old steps go only once the new one is complete (written
    under a temp name and renamed), so a failure half-way loses nothing."""
    directory = Path(directory)
    found = checkpoint.list_checkpoints(directory)
    if found and not overwrite:
        raise UserError(f"{directory} already holds a checkpoint ({', '.join(p.name for p in found)}); import "
                        f"under another run name, or replace it with overwrite=true")
    meta = {"config": {"model": imported.config}, "tokenizer": imported.tokenizer.fingerprint,
            "source": imported.source, "chat_template": imported.chat_template}
    return checkpoint.save(directory, step=0, model=imported.model(), optimizers=[], meta=meta, keep=1,
                           tokenizer=imported.tokenizer, replaces=found)
