"""Chat with a checkpoint over a knowledge base: sources shown, the answer streamed, its citation.

    python -m hybridchat.chat                                  # latest rag checkpoint of hybrid_tiny
    python -m hybridchat.chat --run mamba_tiny --kb my_kb/     # your knowledge base (python -m hybridchat.kb)
    python -m hybridchat.chat -p "Where was Ada Vell born?"    # one question, for scripts
    python -m hybridchat.chat --no-rag                         # closed-book

Each question is answered on its own (retrieval per question, no memory of earlier turns). Without
--kb the knowledge base is the checkpoint's synthetic world; the retriever defaults to the one the
checkpoint was trained with. A refrag checkpoint (or --max-hops 2 and more) answers multi-hop: the
model may write follow-up queries, and the hop trace (each query and the documents it found) is
printed before the answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from hybridchat.core.errors import UserError, run_or_exit


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hybridchat.chat", description=__doc__.split("\n")[0])
    p.add_argument("--run", default="hybrid_tiny", help="run name (the model option it was trained with)")
    p.add_argument("--stage", help="the checkpoint's stage (default: the one that answers from documents, rag)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--checkpoint", help="a step folder, instead of --run/--stage/--step")
    p.add_argument("--checkpoints", default="outputs/checkpoints", help="paths.checkpoints of the training run")
    p.add_argument("--cache-dir", default="outputs/cache", help="paths.cache (where the world's knowledge base is)")
    p.add_argument("--kb", help="knowledge base directory (default: the checkpoint's synthetic world)")
    p.add_argument("--retriever", choices=["simple", "bm25", "dense", "hybrid"])
    p.add_argument("-k", "--top-k", type=int, default=3, help="documents retrieved per question")
    p.add_argument("--no-rag", action="store_true", help="closed-book: no documents")
    p.add_argument("-p", "--prompt", help="answer this one question and exit")
    p.add_argument("--max-tokens", type=int, default=48, help="longest reply")
    p.add_argument("--max-hops", type=int, help="retrievals per question, the question's own included (default: "
                                                "the checkpoint's stage.max_hops for refrag, else 1: one shot)")
    p.add_argument("--device", default="cpu")
    return p


def _retriever(args, meta):
    from omegaconf import OmegaConf

    from hybridchat.infra.context import world_collection
    from hybridchat.data.world import WorldConfig
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.factory import open_knowledge_base

    trained = meta.get("config", {}).get("retriever") or {}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RetrieverConfig), trained))
    cfg = replace(cfg, kind=args.retriever or (cfg.kind if cfg.kind != "none" else "bm25"), kb_dir=args.kb,
                  top_k=args.top_k)
    world = WorldConfig(**meta["config"]["world"]) if "world" in meta.get("config", {}) else WorldConfig()
    return open_knowledge_base(cfg, args.cache_dir, world_collection(world), progress=False).retriever(cfg)


def _print_documents(documents, first: int, out) -> None:
    for i, d in enumerate(documents, first):
        print(f"  [{i}] {d.title} ({d.id}): {' '.join(d.text.split())[:100]}", file=out)


def _print_outcome(result, out) -> None:
    if result.abstained:
        print("(abstained: the documents shown do not hold the answer)", file=out)
    for n, d in zip(result.citations, result.cited):
        print(f"cited: [{n}] {d.title} ({d.id})", file=out)
    print(f"confidence: {result.confidence:.2f}", file=out)


def answer_multihop(question: str, multihop, out=sys.stdout) -> None:
    """The hop trace (the question's sources, then each query the model wrote and what it found),
    then the answer."""
    result = multihop.answer([question])[0]
    first = 1
    for i, hop in enumerate(result.hops):
        if i == 0:
            print("sources:", file=out)
        else:
            refused = "" if hop.status == "ok" else f" ({hop.status.replace('_', ' ')}: not retrieved)"
            print(f"query {i}: {hop.query}{refused}", file=out)
        _print_documents(hop.documents, first, out)
        first += len(hop.documents)
    print(f"answer: {result.reply}", file=out)
    _print_outcome(result, out)


def answer(question: str, answerer, retriever, top_k: int, out=sys.stdout) -> None:
    documents = None
    if retriever is not None:
        documents = [h.document for h in retriever.search([question], top_k=top_k)[0]]
    prompt_ids, shown = answerer.prompt(question, documents)
    if documents is not None:
        print("sources:", file=out)
        _print_documents(shown, 1, out)
        if len(shown) < len(documents):
            print(f"  ({len(documents) - len(shown)} lower-ranked documents left out: the question and "
                  f"{len(documents)} documents do not fit the model's {answerer.max_context}-token context)", file=out)
    tokenizer, streamed = answerer.tokenizer, []
    printed = 0
    print("answer: ", end="", file=out, flush=True)

    def on_token(_: int, token: int) -> None:  # decode the whole reply so far: BPE pieces join up
        nonlocal printed
        streamed.append(token)
        text = tokenizer.decode(streamed)
        print(text[printed:], end="", file=out, flush=True)
        printed = len(text)

    result = answerer.answer([question], None if documents is None else [documents], on_token=on_token)[0]
    print(file=out)
    _print_outcome(result, out)


def run(args) -> None:
    from pathlib import Path

    from hybridchat.infra import checkpoint
    from hybridchat.rag.answer import Answerer
    from hybridchat.training.stages import answering_stage

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    stage = args.stage or answering_stage(1).name
    path = Path(args.checkpoint) if args.checkpoint else checkpoint.find(args.checkpoints, args.run, stage, args.step)
    model, tokenizer, meta = checkpoint.load_model(path, device=args.device)
    seq_len = meta["config"]["model"]["sequence_len"]
    answerer = Answerer(model, tokenizer, seq_len, max_answer_tokens=args.max_tokens, batch_size=1)
    retriever = None if args.no_rag else _retriever(args, meta)
    trained = meta.get("config", {}).get("stage", {})
    max_hops = args.max_hops if args.max_hops is not None else trained.get("max_hops", 1)
    if max_hops < 1:
        raise UserError(f"--max-hops must be >= 1, got {max_hops}")
    print(f"{path} ({'closed-book' if retriever is None else f'top-{args.top_k} retrieval'}"
          f"{f', up to {max_hops} hops' if retriever is not None and max_hops > 1 else ''})", file=sys.stderr)

    multihop = None
    if retriever is not None and max_hops > 1:
        from hybridchat.rag.multihop import MultiHop, Search

        # -k documents per retrieval, the query and context settings the checkpoint was trained with
        # (else the multi-hop stage's defaults)
        defaults = answering_stage(2).config_class
        multihop = MultiHop(model, tokenizer, Search(retriever, args.top_k), seq_len, max_hops=max_hops,
                            max_query_tokens=trained.get("max_query_tokens", defaults.max_query_tokens),
                            max_answer_tokens=args.max_tokens,
                            hop_tokens=trained.get("hop_tokens", defaults.hop_tokens), batch_size=1)

    def ask(question: str) -> None:
        if multihop is not None:
            answer_multihop(question, multihop)
        else:
            answer(question, answerer, retriever, args.top_k)

    if args.prompt is not None:
        ask(args.prompt)
        return
    while True:
        try:
            question = input("\nyou> ").strip()
        except EOFError:
            return
        if question in ("exit", "quit"):
            return
        if question:
            ask(question)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_or_exit(run, args)
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
