"""A tiny rag checkpoint for the server's tests, saved in a fraction of a second (no training).

Its weights are random (so replies depend on the question and its documents), except for a chain
planted in the embedding and the head: after the assistant's start marker the model writes "[1]",
so every reply that reaches it cites document 1, and a page's highlighted citation can be checked.
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from hybridchat.data.chat import ChatRenderer
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.data.world import World, WorldConfig
from hybridchat.infra import checkpoint
from hybridchat.infra.config import Config
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.training.stages.rag import RagConfig

MODEL = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8, headdim=16,
                    mlp_ratio=1, chunk_size=16, sequence_len=384)
WORLD = WorldConfig(seed=3, n_people=40, n_companies=8)


def save_cited_checkpoint(folder: Path, run_name: str = "tiny") -> Path:
    world = World.generate(WORLD)
    tokenizer = Tokenizer.train([d.text for d in world.documents()] * 3, 600)
    torch.manual_seed(0)
    model = HybridLM(MODEL, vocab_size=tokenizer.vocab_size)
    model.init_weights()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        start = ChatRenderer(tokenizer).prompt([{"role": "user", "content": "x"}])[-1]
        chain = [start, *tokenizer.encode("[1]")]
        # Coordinates 0..len(chain)-2 carry the chain alone: token chain[i] writes coordinate i, which
        # the head reads as chain[i + 1].
        model.wte.weight[:, :len(chain)] = 0
        model.lm_head.weight[:, :len(chain)] = 0
        for module in model.blocks.modules():  # no block writes there
            if isinstance(module, torch.nn.Linear) and module.out_features == MODEL.n_embd:
                module.weight[:len(chain)] = 0
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            model.wte.weight[token] = 0
            model.wte.weight[token, i] = 1.0
            model.lm_head.weight[following, i] = 200.0
    config = Config(model=MODEL, stage=RagConfig(), world=WORLD, run_name=run_name,
                    retriever=RetrieverConfig(kind="bm25", top_k=3))
    values = OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)
    meta = {"stage": "rag", "run_name": run_name, "tokenizer": tokenizer.fingerprint, "config": values}
    return checkpoint.save(folder / "checkpoints" / run_name / "rag", 6, model, [], meta, keep=1,
                           tokenizer=tokenizer)


def cited_assistant(folder: Path, max_answer_tokens: int, **options):
    """The server's Assistant (bm25's top 3, the model's own abstentions) over save_cited_checkpoint's
    model; options: Assistant's other keywords (reading=...)."""
    from hybridchat.training.answering import Assistant
    from hybridchat.training.runs import load_run

    step = save_cited_checkpoint(folder)
    run = load_run(step)
    settings = RetrieverConfig(kind="bm25", top_k=3)
    retriever = run.build_retriever(settings, folder / "cache", progress=False)
    return Assistant(step, run, settings, retriever, threshold=None, max_hops=1, max_answer_tokens=max_answer_tokens,
                     **options)
