"""Chat with a checkpoint over a knowledge base: sources shown, the answer streamed, its citation.

    python -m hybridchat.chat                                        # hybrid_tiny's latest refrag (else rag) checkpoint
    python -m hybridchat.chat model=mamba_tiny retriever.kb_dir=my_kb/  # your knowledge base (python -m hybridchat.kb)
    python -m hybridchat.chat prompt="Where was Ada Vell born?"      # one question, for scripts
    python -m hybridchat.chat retriever=none                         # closed-book

A Hydra app sharing evaluate's names and groups (conf/chat.yaml). Each question is answered on its
own (retrieval per question, no memory of earlier turns). Without retriever.kb_dir the knowledge
base is the checkpoint's synthetic world; without a retriever option the retriever is the one the
checkpoint was trained with. Without checkpoint_stage the run's refrag checkpoint answers where it has
one (it answers at once where the first documents hold the answer), else its rag checkpoint. A
refrag checkpoint (or max_hops=2 and more) answers multi-hop: the
model may write follow-up queries, and the hop trace (each query and the documents it found) is
printed before the answer. With reading=rank_order each retrieved document is read alone, in rank
order, and the answer (shown whole) is read from the first one the model does not abstain on.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from hybridchat.core.errors import UserError, run_hydra_app, run_or_exit, undecodable
from hybridchat.infra import config as config_schema
from hybridchat.rag.stream import ReplyStream
from hybridchat.training.answering import AnsweringConfig, open_assistant
from hybridchat.training.stages import stage_schemas


@dataclass
class ChatConfig(AnsweringConfig):
    prompt: Optional[str] = None               # one question; None: interactive


def register() -> None:
    config_schema.register(stage_schemas())
    ConfigStore.instance().store(name="chat_schema", node=ChatConfig)


def _print_documents(documents, first: int, out) -> None:
    for i, d in enumerate(documents, first):
        print(f"  [{i}] {d.title} ({d.id}): {' '.join(d.text.split())[:100]}", file=out)


def _print_outcome(result, out, threshold: float | None) -> None:
    if result.below_threshold:
        print(f"(abstained: the confidence is below the abstention threshold {threshold:.4g})", file=out)
    elif result.over_abstention:
        print(f"(answered: the model began to abstain, but its confidence is at or above the abstention threshold "
              f"{threshold:.4g}; this is its most likely other reply)", file=out)
    elif result.abstained:
        print("(abstained: the documents shown do not hold the answer)", file=out)
    for n, d in zip(result.citations, result.cited):
        print(f"cited: [{n}] {d.title} ({d.id})", file=out)
    # Never a number that is not one: damaged weights gave "confidence: nan" beside a fluent answer.
    finite = math.isfinite(result.confidence)
    print(f"confidence: {result.confidence:.2f}" if finite else "confidence: undefined (the model's "
          "probabilities are not finite numbers: are its weights damaged?)", file=out)


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
    _print_outcome(result, out, multihop.threshold)


def answer_in_rank_order(question: str, reader, retriever, top_k: int, out=sys.stdout) -> None:
    """The sources, then the answer read from the first document that suffices alone (whole: which
    one is known once all are read), and each document's confidence alone."""
    documents = [h.document for h in retriever.search([question], top_k=top_k)[0]]
    result = reader.answer([question], [documents])[0]
    print("sources:", file=out)
    _print_documents(result.documents, 1, out)
    if result.dropped:
        print(f"  ({result.dropped} documents left out: with the question, each alone does not fit the model's "
              f"{reader.answerer.max_context}-token context)", file=out)
    print(f"answer: {result.reply}", file=out)
    alone = ", ".join(f"[{n}] {c:.2f}" for n, c in enumerate(result.read_confidences, 1))
    print(f"read alone in rank order: {f'answered from [{result.read}]' if result.read else 'none suffices'}"
          + (f" (confidence with each: {alone})" if alone else ""), file=out)
    _print_outcome(result, out, reader.threshold)


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
    stream = ReplyStream(answerer.tokenizer)
    print("answer: ", end="", file=out, flush=True)

    def on_token(_: int, token: int) -> None:
        print(stream.push(token), end="", file=out, flush=True)

    result = answerer.answer([question], None if documents is None else [documents], on_token=on_token)[0]
    if result.over_abstention:  # the abstention streamed above was replaced
        print(f"\nanswer instead: {result.reply}", file=out)
    else:  # below the threshold nothing was generated: all of it
        print(stream.finish(result.reply), file=out)
    _print_outcome(result, out, answerer.threshold)


def run(cfg: DictConfig) -> None:
    config: ChatConfig = OmegaConf.to_object(cfg)
    if config.prompt is not None and not config.prompt.strip():
        raise UserError("prompt= is empty: give a question, or leave prompt out to chat")
    assistant = open_assistant(cfg, config)
    answerer, multihop, retriever = assistant.answerer(), assistant.multihop(), assistant.retriever
    reader = assistant.reader()
    seq_len, top_k = assistant.max_context, assistant.settings.top_k
    print(assistant.describe(), file=sys.stderr)

    def ask(question: str) -> None:
        fitted = (multihop or answerer).fit_question(question)
        if fitted != question:
            print(f"(the question's {len(question):,} characters do not fit the model's {seq_len}-token context: "
                  f"cut to its first {len(fitted):,})", file=sys.stderr)
            question = fitted
        if multihop is not None:
            answer_multihop(question, multihop)
        elif reader is not None:
            answer_in_rank_order(question, reader, retriever, top_k)
        else:
            answer(question, answerer, retriever, top_k)

    if config.prompt is not None:
        ask(config.prompt)
        return
    # Bytes that are not UTF-8 reach converse() as surrogates, also where the locale decodes strictly
    # (which raised UnicodeDecodeError)
    sys.stdin.reconfigure(errors="surrogateescape")
    converse(ask)


def converse(ask, read=input, err=sys.stderr) -> None:
    """A question per line until Ctrl-D, `quit` or `exit`, or Ctrl-C at the prompt. Ctrl-C during a
    reply stops that reply only; a line that is not UTF-8 text is refused, and the chat goes on."""
    print("(a question per line; Ctrl-C stops a reply, Ctrl-D or quit ends the chat)", file=err)
    while True:
        try:
            question = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=err)
            return
        if question in ("exit", "quit"):
            return
        if where := undecodable(question):
            print(f"(not UTF-8 text: {where}; ask again in UTF-8)", file=err)
        elif question:
            try:
                ask(question)
            except KeyboardInterrupt:
                print("\n(reply stopped; Ctrl-D or quit ends the chat)", file=err)


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="chat")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_or_exit(run, cfg)
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    run_hydra_app(main)
