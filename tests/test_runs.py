"""hybridchat.training.runs.load_run: a checkpoint's model, tokenizer and typed training config from its
step folder, and the entry points' spelling for chat (conf/chat.yaml)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.data.world import World, WorldConfig
from hybridchat.infra import checkpoint
from hybridchat.infra.config import Config
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.training.runs import load_run
from hybridchat.training.stages.refrag import RefragConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8, headdim=16,
                    mlp_ratio=1, chunk_size=4, sequence_len=64)
WORLD = WorldConfig(seed=3, n_people=100, n_companies=20)


def save(folder: Path, config: dict, stage: str = "refrag") -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["Ada Vell was born in Vellport. Where was Ada Vell born?"] * 20, 400)
    model = HybridLM(MODEL, vocab_size=tokenizer.vocab_size)
    model.init_weights()
    meta = {"stage": stage, "run_name": "r", "tokenizer": tokenizer.fingerprint, "config": config}
    return checkpoint.save(folder / "r" / stage, 6, model, [], meta, keep=1, tokenizer=tokenizer)


def training_config(**retriever) -> dict:
    """meta["config"] as the training loop writes it: the composed Config, resolved, enums as text."""
    config = Config(model=MODEL, stage=RefragConfig(max_hops=3, hop_tokens=99), world=WORLD, run_name="r",
                    retriever=RetrieverConfig(**retriever))
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    return save(tmp_path_factory.mktemp("ckpt"), training_config(kind="simple", top_k=7))


def test_load_run_computes_what_the_folder_loaded_by_hand_computes(step):
    import json

    run = load_run(step)
    meta = json.loads((step / "meta.json").read_text())
    by_hand = HybridLM(ModelConfig(**meta["config"]["model"]), meta["architecture"]["vocab_size"])
    checkpoint.load(step, by_hand)
    idx = torch.tensor([[run.tokenizer.bos_id] + run.tokenizer.encode("Where was Ada Vell born?")])
    with torch.no_grad():
        assert torch.equal(run.model(idx), by_hand.eval()(idx))
    assert not run.model.training and run.meta["step"] == 6 and run.path == step


def test_load_run_types_the_training_config_on_the_stage_s_own_schema(step):
    run = load_run(step)
    assert isinstance(run.stage, RefragConfig) and (run.stage.max_hops, run.stage.hop_tokens) == (3, 99)
    assert (run.retriever.kind, run.retriever.top_k) == ("simple", 7)
    assert run.config.model.sequence_len == 64 and run.config.world == WORLD
    reference = World.generate(WorldConfig(seed=3, n_people=100, n_companies=20))
    assert [d.id for d in run.world.documents()] == [d.id for d in reference.documents()]


def test_a_checkpoint_with_only_its_model_config_gets_the_schema_defaults(tmp_path):
    from dataclasses import asdict

    run = load_run(save(tmp_path, {"model": asdict(MODEL)}, stage="pretrained"))
    assert run.config.world == WorldConfig() and run.retriever.kind == "none" and not hasattr(run.stage, "max_hops")


def test_an_unknown_key_anywhere_in_the_config_is_one_user_error(tmp_path):
    config = training_config()
    config["stage"]["max_hopz"] = 2
    with pytest.raises(UserError, match="does not fit this hybridchat.*max_hopz"):
        load_run(save(tmp_path, config))


def chat(*argv, stdin: bytes | None = None, env: dict | None = None):
    """(exit code, stdout, stderr) of python -m hybridchat.chat; stdin: what is typed (interactive)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "hybridchat.chat", *map(str, argv)], capture_output=True,
                       input=stdin if stdin is not None else b"", cwd=ROOT, env=env, timeout=300)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def test_chat_takes_the_hydra_apps_names_and_defaults_to_the_trained_retriever(step, tmp_path):
    cache = tmp_path / "cache"
    code, out, err = chat(f"paths.checkpoints={step.parents[2]}", "run_name=r", "checkpoint_stage=refrag",
                          f"paths.cache={cache}", "retriever.top_k=2", "max_answer_tokens=3", "max_hops=1",
                          "prompt=Where was Ada Vell born?")
    assert code == 0, err
    assert "sources:" in out and "answer: " in out and "top-2 retrieval" in err
    # no retriever option: the trained kind (simple), so only its index was built
    kbs = [p for p in (cache / "kb").iterdir() if p.is_dir()]
    assert len(kbs) == 1 and sorted(i.name for i in kbs[0].iterdir() if i.is_dir()) == ["simple"]
    code, out, err = chat(f"checkpoint={step}", "retriever=none", "max_answer_tokens=3", "prompt=Hello?")
    assert code == 0 and "sources:" not in out and "closed-book" in err, err
    for args, needle in ((["run_name=nobody", f"paths.checkpoints={tmp_path}"], "holds no checkpoint"),
                         ([f"checkpoint={step}", "retriever.top_k=0"], "retriever.top_k must be >= 1"),
                         (["stage=rag"], "stage")):
        code, _, err = chat(*args, "prompt=x")
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and needle in lines[-1] and "Traceback" not in err, err


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_interactive_chat_cuts_a_long_question_once_and_refuses_a_line_that_is_not_utf8(step, world_cache):
    """A 100 KB question was still running after 90 s (a 5 MB one ran out of memory); bytes that are
    not UTF-8 were a TypeError traceback, or a UnicodeDecodeError where the locale decodes strictly."""
    long = "Where was Ada Vell born? " * 4000
    typed = long.encode() + b"\ncaf\xe9?\nWhere was Ada Vell born?\n"
    for encoding in ({}, {"PYTHONIOENCODING": "utf-8:strict"}):
        code, out, err = chat(f"checkpoint={step}", f"paths.cache={world_cache}", "max_hops=1", "max_answer_tokens=3",
                              stdin=typed, env=encoding)
        assert code == 0 and "Traceback" not in err, err
        assert out.count("answer: ") == 2  # the long question, cut, and the last one
        assert err.count("do not fit the model's 64-token context: cut to its first") == 1, err
        assert err.count("(not UTF-8 text: byte 0xe9 at character 4; ask again in UTF-8)") == 1, err


def test_ctrl_c_during_a_reply_stops_that_reply_and_the_chat_goes_on():
    import io

    from hybridchat.chat import converse

    typed, asked, err = iter(["first", "second", "quit", "never read"]), [], io.StringIO()

    def ask(question):
        asked.append(question)
        if question == "first":
            raise KeyboardInterrupt  # Ctrl-C mid-reply

    try:
        converse(ask, read=lambda prompt: next(typed), err=err)
    except KeyboardInterrupt:  # caught here: pytest would take it for the user's and stop the session
        pytest.fail("Ctrl-C during a reply ended the chat")
    assert asked == ["first", "second"] and next(typed) == "never read"
    assert err.getvalue().count("(reply stopped; Ctrl-D or quit ends the chat)") == 1
    assert "Ctrl-D or quit ends the chat" in err.getvalue().splitlines()[0]  # said before the first question

    def interrupted(prompt):
        raise KeyboardInterrupt  # Ctrl-C at the prompt

    try:
        converse(lambda q: asked.append(q), read=interrupted, err=io.StringIO())  # returns: the chat ends
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C at the prompt was not handled by the chat")
    assert asked == ["first", "second"]


def test_ctrl_c_at_the_prompt_ends_the_chat_cleanly(step, world_cache):
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    # max_hops=1: the test checkpoint's 64-token context holds no multi-hop question (chat refuses to start)
    p = subprocess.Popen([sys.executable, "-m", "hybridchat.chat", f"checkpoint={step}", f"paths.cache={world_cache}",
                          "max_hops=1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        assert p.stdout.read(6) == b"\nyou> "  # waiting at the prompt
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and b"Traceback" not in err, err.decode(errors="replace")


def test_chat_on_your_knowledge_base_uses_the_index_it_has_and_says_so(step, tmp_path):
    """The checkpoint's retriever (here simple) needs an index your knowledge base lacks: chat added it
    to your knowledge base without a word (bm25 to a dense-only one). Now it searches with the index
    the knowledge base has and says so; naming the retriever adds its index, also said."""
    from hybridchat.core.documents import Document
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    kb = tmp_path / "kb"
    KnowledgeBase.build(kb, [Document("d1", "Lava", "Lava erupts from volcanoes."),
                             Document("d2", "Ice", "Glaciers carve valleys.")], ["bm25"], RetrieverConfig(), progress=False)
    before = {p: p.read_bytes() for p in kb.rglob("*") if p.is_file()}
    args = [f"checkpoint={step}", f"retriever.kb_dir={kb}", "max_hops=1", "max_answer_tokens=3", "prompt=Where is lava?"]
    code, out, err = chat(*args)
    assert code == 0, err
    assert f"retriever=bm25: {kb} has no simple index for the checkpoint's retriever=simple" in err
    assert "[1] Lava (d1)" in out
    assert {p: p.read_bytes() for p in kb.rglob("*") if p.is_file()} == before
    code, out, err = chat(*args, "retriever=simple")
    assert code == 0, err
    assert f"{kb}: adding the simple index that retriever.kind=simple needs (it has bm25)" in err
    assert sorted(KnowledgeBase.open(kb).indexes) == ["bm25", "simple"]
