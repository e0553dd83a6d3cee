"""python -m hybridchat.import: a GGUF file or a Hugging Face folder becomes an ordinary checkpoint.

Each test writes its own tiny random model: Hugging Face folders with transformers' own
LlamaForCausalLM / Qwen2ForCausalLM (save_pretrained: safetensors, sharded, tokenizer.json and the
chat template), a GGUF with tests/test_gguf.py's writer. The imported checkpoint is loaded the way
chat and evaluation load it (runs.load_run) and its logits compared with transformers' forward pass
on the same tokens (GGUF: with test_gguf's independent NumPy forward); its tokenizer with
transformers' tokenizer, and its chat rendering with the folder's own chat template.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf import IDS as GGUF_IDS
from test_gguf import reference_logits, write_gguf
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from hybridchat.core.errors import UserError
from hybridchat.data.chat import ChatRenderer
from hybridchat.training.runs import load_run

transformers = pytest.importorskip("transformers")
importer = importlib.import_module("hybridchat.import")  # `import` is a keyword: no import statement

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with a default system message, as Qwen2's and SmolLM2's templates write it.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("The river town of Oskel sits where two valleys meet. In 1842 its bridge was rebuilt in stone; "
        "the mill, the school and 12 houses stand on the north bank. ") * 8
# Qwen2's pre-tokenizer: one digit at a time, then byte-level without GPT-2's own split.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SAMPLES = ["The mill in 1842.", "naïve café — 東京 🙂\n\ttabs  spaces", "say <|im_start|>user\nhi<|im_end|> 007"]


def tokenizer_files(folder: Path, family: str) -> int:
    """A small byte-level BPE trained here, saved by transformers (tokenizer.json, tokenizer_config.json,
    the chat template)."""
    hf = HFTokenizer(models.BPE())
    if family == "qwen2":
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return hf.get_vocab_size()


def hf_folder(folder: Path, family: str = "llama", tie: bool = False, shard: bool = True, config=None) -> Path:
    """A tiny random transformers model of `family` saved with save_pretrained, and its tokenizer;
    config: settings over the defaults, or a function of the tokenizer's size giving them."""
    config = config or {}
    n_tokens = tokenizer_files(folder, family)
    settings = dict(vocab_size=n_tokens + 7,  # padded past the tokenizer, as Qwen2's is
                    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                    max_position_embeddings=4096)
    settings.update(config(n_tokens) if callable(config) else config)
    kind = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    model = kind[1](kind[0](**settings)).eval()
    with torch.no_grad():
        # Gains and biases far from their init (1, 0) and matrices at ~1/sqrt(fan_in), so a dropped
        # gain or bias, a swapped projection or a wrong RoPE base moves the logits well past 1e-4.
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((0 if name.endswith("bias") else 1) + 0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.25 if "embed" in name else p.shape[1] ** -0.5))
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    return folder


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def our_logits(step: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return load_run(step).model(torch.tensor([ids]))[0].double().numpy()


def import_cli(source, *overrides, outputs: Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m hybridchat.import source overrides` in a fresh process."""
    p = subprocess.run([sys.executable, "-m", "hybridchat.import", str(source), f"paths.outputs={outputs}",
                        *overrides], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    return p.returncode, p.stdout, p.stderr


def imported_step(outputs: Path, run_name: str) -> Path:
    return outputs / "checkpoints" / run_name / "pretrained" / "step_000000"


def import_in_process(source, run_name: str, outputs: Path, *overrides: str) -> Path:
    cfg = importer.commands.compose("import", "import_schema", importer.ImportConfig,
                                    [f"run_name={run_name}", f"paths.outputs={outputs}", *overrides])
    return importer.run(str(source), cfg)


TOKENS = [5, 40, 77, 140, 262, 263, 120, 3, 259, 33, 90, 2, 264, 200, 17, 60, 1, 300]


@pytest.mark.parametrize("family, tie, shard", [("llama", False, True), ("llama", True, False),
                                                ("qwen2", False, True), ("qwen2", True, True)])
def test_hf_folder_imports_with_transformers_logits(tmp_path, family, tie, shard):
    folder = hf_folder(tmp_path / "model", family, tie=tie, shard=shard)
    assert (folder / "model.safetensors.index.json").is_file() == shard
    step = import_in_process(folder, "m", tmp_path / "out")
    assert step == imported_step(tmp_path / "out", "m")
    ours, theirs = our_logits(step, TOKENS), hf_logits(folder, TOKENS)
    assert np.abs(theirs).max() > 1.0  # logits large enough for a wrong weight to show
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    run = load_run(step)
    model = run.config.model
    assert (model.rope_base, model.norm_eps, model.tie_embeddings, model.qkv_bias, model.n_kv_head) == (
        5000.0, 1e-5, tie, family == "qwen2", 2)
    assert run.meta["source"] == "huggingface:model" and run.meta["chat_template"] == CHAT_TEMPLATE


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_and_chat_template_are_the_folders(tmp_path, family):
    folder = hf_folder(tmp_path / "model", family, shard=False)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    tok = load_run(import_in_process(folder, "m", tmp_path / "out")).tokenizer
    for text in SAMPLES + [TEXT[:200]]:
        ids = tok.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False) or "<|im_" in text
        assert tok.decode(ids) == text
    # Text spelling a control token stays text with us (special tokens come from the renderer, by id).
    assert not set(tok.encode(SAMPLES[2])) & {tok.token_id(t) for t in SPECIAL}
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the mill in?"},
                    {"role": "assistant", "content": "1842"}, {"role": "user", "content": "and the school?"}]
    for messages in (conversation, conversation[1:]):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if not isinstance(expected, list) else expected
        if messages[0]["role"] != "system":  # the template's default system message; ours adds none
            messages = [{"role": "system", "content": "Be brief."}, *messages]
        assert ChatRenderer(tok).prompt(messages) == expected


def test_gguf_file_through_the_command(tmp_path):
    gguf = write_gguf(tmp_path / "tiny.gguf")
    code, out, err = import_cli(gguf, "run_name=g", outputs=tmp_path / "out")
    assert code == 0, err
    step = imported_step(tmp_path / "out", "g")
    assert str(step) in out and "python -m hybridchat.chat run_name=g checkpoint_stage=pretrained" in out
    np.testing.assert_allclose(our_logits(step, GGUF_IDS), reference_logits(gguf, GGUF_IDS), rtol=0, atol=1e-4)
    assert load_run(step).meta["source"] == "gguf:tiny.gguf"


def test_chat_reads_the_import_at_once(tmp_path):
    folder = hf_folder(tmp_path / "model", "qwen2", shard=False)
    step = import_in_process(folder, "q", tmp_path / "out")
    p = subprocess.run([sys.executable, "-m", "hybridchat.chat", "run_name=q", "checkpoint_stage=pretrained",
                        f"paths.outputs={tmp_path / 'out'}", "retriever=none", "prompt=Where is the mill?",
                        "max_answer_tokens=4"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert "answer:" in p.stdout and str(step) in p.stderr


def test_the_printed_training_command_tunes_the_import(tmp_path, capsys):
    """The printed line names no model: the run trains its stage.source checkpoint's architecture. A
    Qwen2 import (q/k/v biases included) RAG-tunes in a smoke run (debug=smoke's tiny model sizes give
    way to the import's; the command line's model.sequence_len still applies), and its weights moved."""
    from conftest import compose_config

    from hybridchat.train import run

    step = import_in_process(hf_folder(tmp_path / "model", "qwen2", shard=False), "q", tmp_path / "out")
    line = [t for t in capsys.readouterr().out.splitlines() if "python -m hybridchat.train" in t][0]
    printed = line.split("python -m hybridchat.train ")[1].split()
    assert not any(o.startswith("model") for o in printed)
    run(compose_config([*printed, "debug=smoke", f"paths.outputs={tmp_path / 'out'}", "stage.num_steps=2",
                        "stage.eval_every=2", "stage.eval_questions=2", "stage.max_documents=1", "gpu.micro_batch=1",
                        "model.sequence_len=512"], output_dir=tmp_path / "run"))
    tuned = load_run(tmp_path / "out" / "checkpoints" / "q" / "rag" / "step_000002")
    assert tuned.meta["config"]["stage"]["source"] == "pretrained" and tuned.config.model.qkv_bias
    assert tuned.meta["architecture"] == load_run(step).meta["architecture"]
    assert tuned.config.model.sequence_len == 512
    assert not np.array_equal(our_logits(tuned.path, TOKENS), our_logits(step, TOKENS))


def test_an_import_distils_into_a_hybrid_with_only_the_block_pattern_given(tmp_path):
    """stage=distill from the import: the student is the import's architecture with the command line's
    block pattern (its Mamba-2 shape comes with the import), converted and trained two steps."""
    from conftest import compose_config

    from hybridchat.train import run

    import_in_process(hf_folder(tmp_path / "model", "llama", shard=False), "q", tmp_path / "out")
    (tmp_path / "text.jsonl").write_text((json.dumps({"text": TEXT}) + "\n") * 40)  # 40 documents
    run(compose_config(["run_name=q", "stage=distill", "stage.source=pretrained", "model.block_pattern=AM",
                        "debug=smoke", f"paths.outputs={tmp_path / 'out'}", "stage.num_steps=2", "stage.eval_every=2",
                        "gpu.micro_batch=1", "model.sequence_len=128", "data=text", f"data.path={tmp_path / 'text.jsonl'}"],
                       output_dir=tmp_path / "run"))
    student = load_run(tmp_path / "out" / "checkpoints" / "q" / "distill" / "step_000002")
    teacher = load_run(tmp_path / "out" / "checkpoints" / "q" / "pretrained" / "step_000000")
    assert student.meta["architecture"]["block_pattern"] == "AM"
    assert {k: v for k, v in student.meta["architecture"].items() if k in teacher.meta["architecture"]
            and k != "block_pattern"} == {k: v for k, v in teacher.meta["architecture"].items() if k != "block_pattern"}


def typed(overrides: list[str]):
    from conftest import compose_config
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_config(overrides))


def test_a_run_takes_its_sources_model_only_where_it_chose_none_and_the_default_does_not_fit(tmp_path):
    """source_model against the imported checkpoint's own config: the import's model for a run that
    composed the default, None where the composed model already fits (a training window of its own
    is kept), the command line's keys on top; model_choice reads model=, experiments and model.* keys."""
    from dataclasses import replace

    from hydra.core.hydra_config import HydraConfig

    from hybridchat.infra.context import source_model
    from hybridchat.train import model_choice

    step = import_in_process(hf_folder(tmp_path / "model", "qwen2", shard=False), "q", tmp_path / "out")
    imported = load_run(step).config.model
    config = typed(["run_name=q", "stage=rag", "stage.source=pretrained", f"paths.outputs={tmp_path / 'out'}"])
    assert model_choice(HydraConfig.get()) == (False, set())
    assert source_model(config, set()) == imported
    config.model.sequence_len = 300  # set on the command line: kept, the rest is the import's
    assert source_model(config, {"sequence_len"}) == replace(imported, sequence_len=300)
    config.model = replace(imported, sequence_len=123, name="mine")  # fits the checkpoint: left as composed
    assert source_model(config, set()) is None
    config.stage.source = None
    assert source_model(config, set()) is None

    typed(["model.sequence_len=512", "model/block_pattern=jamba", "+model.x=1"])
    assert model_choice(HydraConfig.get()) == (False, {"sequence_len", "block_pattern", "x"})
    for chooses in (["model=hybrid_tiny"], ["experiment=smollm2_rag"], ["model=transformer_tiny"]):
        typed(chooses)
        assert model_choice(HydraConfig.get())[0], chooses


def test_a_run_that_chose_its_model_is_still_refused_a_checkpoint_it_does_not_fit(tmp_path):
    from conftest import compose_config

    from hybridchat.train import run

    import_in_process(hf_folder(tmp_path / "model", "qwen2", shard=False), "q", tmp_path / "out")
    with pytest.raises(UserError, match="does not fit this model"):
        run(compose_config(["run_name=q", "stage=rag", "stage.source=pretrained", "model=smollm2_135m", "debug=smoke",
                            f"paths.outputs={tmp_path / 'out'}"], output_dir=tmp_path / "run"))


# transformers' names -> GGUF's (convert_hf_to_gguf's tensor map), written out here on their own.
TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def qwen2_gguf(folder: Path, path: Path) -> Path:
    """The folder's Qwen2 model as convert_hf_to_gguf writes one: qwen2 metadata, the tokenizer's
    vocabulary, merges and control tokens, float32 tensors renamed (Qwen2's Q/K are not permuted)."""
    from gguf import GGUFWriter, TokenType
    from safetensors.torch import load_file

    c, t = json.loads((folder / "config.json").read_text()), json.loads((folder / "tokenizer.json").read_text())
    tokens = sorted(t["model"]["vocab"], key=t["model"]["vocab"].get)
    special = {a["content"] for a in t["added_tokens"] if a["special"]}
    w = GGUFWriter(path, "qwen2")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if tok in special else TokenType.NORMAL for tok in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in t["model"]["merges"]])
    w.add_chat_template(CHAT_TEMPLATE)
    weights = load_file(str(folder / "model.safetensors"))
    for name, tensor in weights.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{TO_GGUF[module]}.{kind}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        w.add_tensor(name, tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_qwen2_gguf_imports_with_transformers_logits_and_tokenizer(tmp_path):
    # GGUF's vocabulary is the tokenizer's: no padding past it
    folder = hf_folder(tmp_path / "model", "qwen2", shard=False, config=lambda n_tokens: {"vocab_size": n_tokens})
    step = import_in_process(qwen2_gguf(folder, tmp_path / "qwen2.gguf"), "g", tmp_path / "out")
    np.testing.assert_allclose(our_logits(step, TOKENS), hf_logits(folder, TOKENS), rtol=0, atol=1e-4)
    tok, theirs = load_run(step).tokenizer, transformers.AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES[:2] + [TEXT[:200], "cafe\u0301 1842"]:  # a decomposed é: NFC composes it first
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_existing_import_is_kept_unless_overwrite(tmp_path, monkeypatch):
    first = hf_folder(tmp_path / "first", "llama", shard=False)
    second = hf_folder(tmp_path / "second", "qwen2", shard=False)
    outputs = tmp_path / "out"
    step = import_in_process(first, "m", outputs)
    before = snapshot(outputs)
    with pytest.raises(UserError, match="already holds a checkpoint .*overwrite=true"):
        import_in_process(second, "m", outputs)
    assert snapshot(outputs) == before
    # A failure while writing (here: the weights cannot be saved) leaves the old checkpoint whole.
    from hybridchat.infra import checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_file", disk_full)
        with pytest.raises(OSError):
            import_in_process(second, "m", outputs, "overwrite=true")
    assert snapshot(outputs) == before
    assert import_in_process(second, "m", outputs, "overwrite=true") == step
    assert load_run(step).meta["source"] == "huggingface:second"
    assert [p.name for p in step.parent.iterdir()] == ["step_000000"]  # no temp folder left behind


def _break(folder: Path, file: str, change) -> None:
    data = json.loads((folder / file).read_text())
    change(data)
    (folder / file).write_text(json.dumps(data))


BAD = {
    "model type": ("config.json", lambda c: c.update(model_type="gpt2"),
                   "model_type='gpt2' is not supported (supported: llama, qwen2)"),
    "rope scaling": ("config.json", lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 5000.0}),
                     "rope_type='linear'; only plain RoPE"),
    "activation": ("config.json", lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    "attention bias": ("config.json", lambda c: c.update(attention_bias=True), "attention_bias=True is not supported"),
    "head dim": ("config.json", lambda c: c.update(head_dim=32), "head_dim=32 is not supported"),
    "sliding window": ("config.json", lambda c: c.update(use_sliding_window=True),
                       "use_sliding_window=True is not supported"),
    "missing shard": ("model.safetensors.index.json",
                      lambda c: c["weight_map"].update({"model.norm.weight": "model-99.safetensors"}),
                      "shard(s) ['model-99.safetensors'] that are not there"),
    "sizes": ("config.json", lambda c: c.update(num_key_value_heads=3), "must be divisible by model.n_kv_head=3"),
    "tokenizer": ("tokenizer.json", lambda t: t.update(decoder={"type": "Metaspace", "replacement": "▁",
                                                                "prepend_scheme": "always", "split": True}),
                  "decoder 'Metaspace'; only byte-level BPE"),
}


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("hf") / "model", "llama")


@pytest.mark.parametrize("kind", sorted(BAD))
def test_unsupported_folders_are_one_line_and_write_nothing(good_folder, tmp_path, kind):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    file, change, says = BAD[kind]
    _break(folder, file, change)
    with pytest.raises(UserError) as e:
        import_in_process(folder, "m", tmp_path / "out")
    assert says in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_tied_model_may_save_its_head_only_as_the_embedding(good_folder, tmp_path):
    """tie_word_embeddings decides, not whether lm_head.weight was saved: a saved copy of the
    embedding is the tied head (transformers ties it too); a saved head that differs is refused,
    since transformers 4 ties it away and 5 keeps it (which model it is depends on the version)."""
    import shutil

    from safetensors.torch import load_file, save_file

    tied = hf_folder(tmp_path / "tied", "llama", tie=True, shard=False)
    weights = load_file(str(tied / "model.safetensors"))
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()},
              str(tied / "model.safetensors"), metadata={"format": "pt"})
    step = import_in_process(tied, "m", tmp_path / "out")
    assert load_run(step).config.model.tie_embeddings
    np.testing.assert_allclose(our_logits(step, TOKENS), hf_logits(tied, TOKENS), rtol=0, atol=1e-4)
    untied = tmp_path / "untied"
    shutil.copytree(good_folder, untied)
    _break(untied, "config.json", lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(UserError, match="tie_word_embeddings=true, but the saved lm_head.weight differs"):
        import_in_process(untied, "u", tmp_path / "out")


@pytest.mark.parametrize("template, says", [
    (CHAT_TEMPLATE.replace("{{ m['role'] }}\n", "{{ m['role'] }}: "), "system: Be brief."),
    ("{{ raise_exception('no system role') }}", "does not render (TemplateError: no system role)"),
])
def test_a_chat_template_other_than_chatml_is_refused(good_folder, tmp_path, template, says):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(UserError, match="its chat template is not the ChatML hybridchat renders") as e:
        import_in_process(folder, "m", tmp_path / "out")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_an_unsupported_model_type_is_told_before_missing_weights(good_folder, tmp_path, capsys):
    """A folder of another architecture is refused for what it is, not for the weights a user would
    then go and fetch in vain."""
    import shutil

    from conftest import command_result

    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    _break(folder, "config.json", lambda c: c.update(model_type="mistral"))
    for weights in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        weights.unlink(missing_ok=True)
    code, _, err = command_result(importer.main, (folder, "run_name=m", f"paths.outputs={tmp_path / 'out'}"), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: Hugging Face folder {folder}: "), err
    assert "model_type='mistral' is not supported (supported: llama, qwen2)" in lines[0]


def test_a_folder_without_a_chat_template_is_imported_as_chatml_with_a_warning(good_folder, tmp_path, capsys):
    """A base model has no chat template and is worth importing to tune: imported, with one warning
    line naming where a template was looked for and the ChatML it will be prompted in."""
    import shutil

    from conftest import command_result

    folder = tmp_path / "base"
    shutil.copytree(good_folder, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    _break(folder, "tokenizer_config.json", lambda t: t.pop("chat_template", None))
    code, out, err = command_result(importer.main, (folder, "run_name=b", f"paths.outputs={tmp_path / 'out'}"), capsys)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and "error" not in err, err
    assert len(warnings) == 1 and str(folder) in warnings[0] and "chat_template.jinja" in warnings[0]
    assert "tokenizer_config.json" in warnings[0] and "ChatML" in warnings[0]
    run = load_run(imported_step(tmp_path / "out", "b"))
    assert run.meta["chat_template"] is None
    # prompted in ChatML, as the warning says
    assert run.tokenizer.decode(ChatRenderer(run.tokenizer).prompt(PROBE_CHAT)).startswith("<|im_start|>user\nHi")


PROBE_CHAT = [{"role": "user", "content": "Hi"}]


def test_command_line_errors_are_one_line(tmp_path, good_folder, capsys):
    from conftest import command_result

    for argv, says in [((tmp_path / "nothing",), "no such file or folder"), (("run_name=x",), "the first word is"),
                       ((good_folder, "run_name=a/b", f"paths.outputs={tmp_path}"), "plain folder name"),
                       ((good_folder, "run_nam=x"), "Key 'run_nam' not in 'ImportConfig'")]:
        code, _, err = command_result(importer.main, argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not (tmp_path / "checkpoints").exists()


def test_a_qwen2_model_is_not_converted_to_mamba():
    from hybridchat.model.config import ModelConfig
    from hybridchat.model.convert import attention_to_mamba
    from hybridchat.model.lm import HybridLM

    config = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_pattern="AM", qkv_bias=True, expand=1,
                         headdim=16, d_state=16, ngroups=4)
    model = HybridLM(config, vocab_size=32)
    with pytest.raises(UserError, match="q/k/v biases .* cannot be converted to Mamba-2"):
        attention_to_mamba(model.blocks[0].mixer, model.blocks[1].mixer)
