"""Multi-hop answering (recursive RAG): the model reads the documents found for the question, may
write a follow-up query, is shown what retrieval finds for it, and so on, then answers or abstains.

    question -> hop-1 documents (in the user turn)
      -> reply: <|query_start|>[1] Kor Industries<|query_end|>   written by the model, citing where it read the name
                <|documents_start|>[3] ... [4] ...<|documents_end|>   injected by the engine's query hook
                [3] Tam Brel<|assistant_end|>   the answer, citing across all documents shown

Three pluggable pieces:
- `QueryGenerator`: who writes the follow-up queries. `ModelQueries` (default): the model, caught by
  the engine's query hook as it writes them. `BridgeQueries`: a rule-based baseline that writes the
  query for the model (forced into the reply before it generates): the question plus the names in
  the newest documents that the question does not mention, so the retriever can rank the bridge
  entity's document; it knows nothing of the synthetic world's templates.
- `Search`: the retriever call (any retriever's `search`, with optional metadata filters).
- the reward (hybridchat/training/stages/refrag.py) reads the `Trajectory` this module returns.

A hop is one retrieval: the question's own is hop 1, so `max_hops=2` allows one follow-up query. A
query past max_hops, an empty one or one whose documents do not fit the context is answered with an
empty results section: the trace records why, retrieval is not called, and the model goes on to
answer. Where the query's end marker is a token of its own, decoding offers it only inside a query
the reply opened (the engine's paired_tokens): a reply is never closed as a query it did not open
(what a model taught both "[1] name<|query_end|>" queries and "[1] name" replies is tempted to
write). A reply that runs out of tokens inside a query gives no answer (counted as an abstention,
format invalid).
"""

from __future__ import annotations

import re
import time
from abc import ABC
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from hybridchat.core.documents import Document
from hybridchat.model.engine import Engine
from hybridchat.rag.abstention import below
from hybridchat.rag.answer import ABSTAIN, Answer, Answerer, confidence_of, fit_prompt, fit_question, parse_reply
from hybridchat.rag.coverage import Coverage

# Capitalised word runs ("Kor Industries", "Vellport"): a generic notion of a name in English text.
_NAME = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:of\s+|de\s+|van\s+)?[A-Z][\w'-]*)*")


@dataclass
class Hop:
    query: str                     # as written ("[1] Drinburg"); the question itself for hop 1
    documents: list[Document]      # new documents shown for it, numbered on from the hops before
    status: str = "ok"             # ok | empty | over_max_hops | no_room
    forced: bool = False           # written for the model by a rule, not by the model


def search_text(query: str) -> str:
    """A query may cite where its entity was read, as an answer does ("[1] Drinburg"): the model
    first picks the document, then copies from it, the reading it already does for an answer.
    Retrieval gets the rest."""
    return parse_reply(query)[0]


class Search:
    """The retriever call: top-k new documents for a query (already shown ones skipped)."""

    def __init__(self, retriever, top_k: int, filters: Mapping[str, Any] | None = None):
        self.retriever, self.top_k, self.filters = retriever, top_k, filters

    def __call__(self, queries: Sequence[str], shown: Sequence[Sequence[Document]] = ()) -> list[list[Document]]:
        shown = list(shown) or [()] * len(queries)
        extra = max((len(s) for s in shown), default=0)
        hits = self.retriever.search(list(queries), top_k=self.top_k + extra, filters=self.filters)
        out = []
        for row, seen in zip(hits, shown):
            seen_ids = {d.id for d in seen}
            out.append([h.document for h in row if h.document.id not in seen_ids][:self.top_k])
        return out


class QueryGenerator(ABC):
    """Who writes the follow-up queries. `model_writes`: the model's own queries are followed;
    `query`: a query written for the model (before it generates), None when there is none."""
    model_writes = False

    def query(self, question: str, hops: Sequence[Hop]) -> str | None:
        return None


class ModelQueries(QueryGenerator):
    """The model writes its queries (refrag); the engine's query hook retrieves for them."""
    model_writes = True


class NoQueries(QueryGenerator):
    """Single-shot RAG: one retrieval for the question; a query the model writes is refused."""


class BridgeQueries(QueryGenerator):
    """Rule-based baseline: the question plus the names in the newest hop's documents that neither
    the question nor an earlier query holds (the bridge entity is named in the document that
    answers the first hop, and the retriever ranks the candidates against the question)."""

    def __init__(self, documents: int = 1):
        self.documents = documents  # newest documents read for names, best first

    def query(self, question: str, hops: Sequence[Hop]) -> str | None:
        known = " ".join([question, *(h.query for h in hops), *(d.title for h in hops[:-1] for d in h.documents)])
        names = [n for d in hops[-1].documents[:self.documents] for n in _NAME.findall(d.text)
                 if n not in known and n != d.title]
        names = list(dict.fromkeys(n for n in names if len(n) > 1))
        return f"{question} {' '.join(names)}" if names else None


@dataclass
class Trajectory:
    """One generated reply with everything a reward or a loss needs."""
    index: int                     # the question's position in the batch
    prompt: list[int]              # up to the assistant header, forced hops included
    tokens: list[int]              # after the prompt: written and injected, the stop token when it stopped
    written: list[int]             # 1 where the model wrote the token, 0 where it was injected
    hops: list[Hop]
    finish: str                    # stop | length
    answer_start: int              # where the final answer starts in tokens

    @property
    def documents(self) -> list[Document]:
        return [d for h in self.hops for d in h.documents]


@dataclass
class RowState:
    """One reply's hops so far, as its decode goes (the engine's query hook here, the server's batch)."""
    prompt_len: int
    hops: list[Hop]
    segment: int = 0               # where the text written since the last injection starts in `out`
    injected: list[tuple[int, int]] = field(default_factory=list)  # (start, length) in `out`


class MultiHop:
    """Multi-hop generation over a batch of questions; `answer` for greedy replies (evaluation,
    chat), `rollouts` for sampled trajectories (GRPO). threshold: `answer` answers exactly where the
    confidence after the last hop is at or above it, as Answerer does (None: the model's own decision),
    weighed by the coverage of the question by every hop's documents where coverage_exponent > 0."""

    def __init__(self, model, tokenizer, search: Callable[..., list[list[Document]]], max_context: int,
                 queries: QueryGenerator | None = None, max_hops: int = 2, max_query_tokens: int = 16,
                 max_answer_tokens: int = 24, hop_tokens: int = 256, batch_size: int = 32,
                 threshold: float | None = None, coverage: Coverage | None = None, coverage_exponent: float = 0.0):
        if max_hops < 1:
            raise ValueError(f"max_hops={max_hops} must be >= 1")
        self.answerer = Answerer(model, tokenizer, max_context, max_answer_tokens, batch_size, threshold, coverage,
                                 coverage_exponent)
        self.model, self.tokenizer, self.renderer = model, tokenizer, self.answerer.renderer
        self.search, self.queries = search, queries or ModelQueries()
        self.max_context, self.max_hops, self.max_query_tokens = max_context, max_hops, max_query_tokens
        self.max_answer_tokens, self.hop_tokens, self.batch_size = max_answer_tokens, hop_tokens, batch_size
        self.query_start, self.query_end = self.renderer.query_markers
        # Our end marker is a special token, which decoding offers only inside a query the reply opened
        # (engine's paired_tokens). ChatML's is a newline, ordinary text outside a query.
        opening, closing = self.renderer.format.query
        self.query_pair = (opening[0], closing[0]) if self.query_end in tokenizer.special_tokens else None

    @property
    def max_new_tokens(self) -> int:
        return (self.max_hops - 1) * (self.max_query_tokens + 2) + self.max_answer_tokens

    def _room(self, hops_left: int) -> int:
        """Tokens kept free for what is still to be written and retrieved."""
        return self.max_answer_tokens + 1 + hops_left * (self.max_query_tokens + 2 + self.hop_tokens)

    @property
    def _first_hop_tokens(self) -> int:
        return self.max_context - self._room(self.max_hops - 1)

    def fit_question(self, question: str) -> str:
        """The question cut to what hop 1's prompt holds, room kept for the hops to come."""
        return fit_question(self.renderer, question, self._first_hop_tokens)

    def plan(self, question: str, first: Sequence[Document], queries: QueryGenerator | None = None) -> list[Hop]:
        """Hop 1 (the question's documents that fit, leaving room for the hops to come), then the
        queries the generator writes for the model, each with the documents retrieval finds for it.
        The question must fit already (fit_question)."""
        queries = queries or self.queries
        _, shown = fit_prompt(self.renderer, question, first, self._first_hop_tokens)
        hops = [Hop(question, shown)]
        while len(hops) < self.max_hops and (query := queries.query(question, hops)) is not None:
            used = len(self.prompt(question, hops)) + len(self.renderer.query(query))
            found = self.search([search_text(query)], [self._shown(hops)])[0]
            hops.append(Hop(query, self._fit(found, used, self.max_hops - len(hops) - 1, len(self._shown(hops)) + 1),
                            forced=True))
        return hops

    def prompt(self, question: str, hops: Sequence[Hop]) -> list[int]:
        """The prompt: the question with hop 1's documents, then the forced hops, query and results."""
        ids = self.renderer.prompt([{"role": "user", "content": question, "documents": hops[0].documents}])
        for i, hop in enumerate(hops[1:], 1):
            ids += self.renderer.query(hop.query) + self.renderer.results(hop.documents, len(self._shown(hops[:i])) + 1)
        return ids

    @staticmethod
    def _shown(hops: Sequence[Hop]) -> list[Document]:
        return [d for h in hops for d in h.documents]

    def _fit(self, documents: Sequence[Document], used: int, hops_left: int, first: int) -> list[Document]:
        """The best-ranked documents whose results section fits after `used` tokens."""
        docs = list(documents)
        while docs and used + len(self.renderer.results(docs, first)) > self.max_context - self._room(hops_left):
            docs.pop()
        return docs

    def _hook(self, states: list[RowState]):
        """The engine's query hook: when the model has just closed a query, retrieve for it and return
        the results section to inject (an empty one for a query that is refused)."""

        def hook(seq: int, out: list[int]) -> list[int] | None:
            state = states[seq]
            hop = self.written_query(state, out)
            if hop is None:
                return None
            return self.follow(state, out, hop, self.retrieve([(state, hop)])[0])

        return hook

    # The hook's steps, also for a caller that decodes otherwise (the server's continuous batch,
    # serve/batcher.py, which retrieves for the queries of several replies at once).

    def written_query(self, state: RowState, out: list[int]) -> Hop | None:
        """The hop asked for by the query that out's last token (just sampled) closes, without its
        documents yet; its status says whether it is followed ("ok") or why not. None: no query closed."""
        if self.query_end not in self.tokenizer.decode(out[-1:]):
            return None
        text = self.tokenizer.decode(out[state.segment:])
        start = text.rfind(self.query_start)
        if start < 0:
            return None  # a newline in a ChatML answer: text, not a query (ours closes only an opened one)
        query = text[start + len(self.query_start):]
        query = query[:query.find(self.query_end)] if self.query_end in query else query
        query = " ".join(query.split())
        status = "ok" if search_text(query) else "empty"  # "[1]" alone asks for nothing
        if status == "ok" and (not self.queries.model_writes or len(state.hops) >= self.max_hops):
            status = "over_max_hops"
        return Hop(query, [], status)

    def retrieve(self, asked: Sequence[tuple[RowState, Hop]]) -> list[list[Document]]:
        """What retrieval finds for each (reply, hop) asked, in one call: new documents for the hops
        followed, nothing for the others (retrieval is not called for them)."""
        followed = [(state, hop) for state, hop in asked if hop.status == "ok"]
        found = iter(self.search([search_text(hop.query) for _, hop in followed],
                                 [self._shown(state.hops) for state, _ in followed]) if followed else [])
        return [next(found) if hop.status == "ok" else [] for _, hop in asked]

    def follow(self, state: RowState, out: list[int], hop: Hop, found: Sequence[Document]) -> list[int]:
        """Add the hop to the reply's trace with those of `found` (retrieval's for it) that fit the
        context, and return its results section: the tokens to append after out."""
        first = len(self._shown(state.hops)) + 1
        if hop.status == "ok":
            used = state.prompt_len + len(out)  # _fit counts the results section, its markers included
            hop.documents = self._fit(found, used, self.max_hops - len(state.hops) - 1, first)
            if found and not hop.documents:
                hop.status = "no_room"
        state.hops.append(hop)
        injected = self.renderer.results(hop.documents, first)
        state.injected.append((len(out), len(injected)))
        state.segment = len(out) + len(injected)
        return injected

    @torch.no_grad()
    def rollouts(self, questions: Sequence[str], first: Sequence[Sequence[Document]] | None = None,
                 num_samples: int = 1, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None) -> list[Trajectory]:
        """num_samples trajectories per question (sequence i * num_samples + s is sample s of question
        i); `first`: the hop-1 documents per question (None: retrieved here). A question too long for
        the context is cut (fit_question)."""
        questions = [self.fit_question(q) for q in questions]
        first = list(first) if first is not None else self.search(questions)
        plans = [self.plan(q, d) for q, d in zip(questions, first)]
        prompts = [self.prompt(q, hops) for q, hops in zip(questions, plans)]
        states = [RowState(len(p), [Hop(h.query, list(h.documents), h.status, h.forced) for h in hops])
                  for p, hops in zip(prompts, plans) for _ in range(num_samples)]
        result = Engine(self.model).generate(
            prompts, max_new_tokens=self.max_new_tokens, temperature=temperature, top_k=top_k,
            stop_tokens=[self.renderer.stop_token], paired_tokens=self.query_pair,
            num_samples=num_samples, seed=seed, query_hook=self._hook(states),
            extra_len=max(0, self.max_context - min(len(p) for p in prompts)))
        return [self.trajectory(seq // num_samples, prompts[seq // num_samples], states[seq], tokens, finish)
                for seq, (tokens, finish) in enumerate(zip(result.tokens, result.finish_reasons))]

    def trajectory(self, index: int, prompt: list[int], state: RowState, tokens: list[int], finish: str) -> Trajectory:
        """A finished reply's Trajectory: `tokens` are what followed the prompt, written and injected
        (no stop token), `finish` why it ended (stop | length)."""
        written = [1] * len(tokens)
        for start, length in state.injected:
            written[start:start + length] = [0] * length
        if finish == "stop":
            tokens, written = tokens + [self.renderer.stop_token], written + [1]
        return Trajectory(index, prompt, list(tokens), written, state.hops, finish, state.segment)

    def reply(self, t: Trajectory) -> tuple[str, bool]:
        """The final answer's text and whether the trajectory is well-formed: it stopped, every query
        was followed, and the answer is the abstention or cites a document shown."""
        tail = t.tokens[t.answer_start:]
        if t.finish == "stop":
            tail = tail[:-1]
        text = self.tokenizer.decode(tail).strip()
        answer, citations, abstained = parse_reply(text)
        ok = (t.finish == "stop" and self.query_start not in text and all(h.status == "ok" for h in t.hops)
              and (abstained or (bool(citations) and all(1 <= n <= len(t.documents) for n in citations))))
        return text, ok

    def answer(self, questions: Sequence[str], first: Sequence[Sequence[Document]] | None = None) -> list[Answer]:
        """Greedy multi-hop replies, one Answer per question, with its hop trace."""
        out: list[Answer] = []
        for lo in range(0, len(questions), self.batch_size):
            batch = list(questions[lo:lo + self.batch_size])
            t0 = time.perf_counter()
            trajectories = self.rollouts(batch, None if first is None else first[lo:lo + self.batch_size])
            prefixes = [self.prefix(t) for t in trajectories]
            confidence = [self.answerer.weigh(c, q, t.documents)
                          for q, t, c in zip(batch, trajectories, self.answerer.confidence(prefixes).tolist())]
            overruled = [j for j, t in enumerate(trajectories) if self.overrules(t, confidence[j])]
            if overruled:
                instead = self.answerer.answers_instead([prefixes[j] for j in overruled])
                for j, tokens, finish in zip(overruled, instead.tokens, instead.finish_reasons):
                    trajectories[j] = self.instead(trajectories[j], tokens, finish)
            seconds = (time.perf_counter() - t0) / len(batch)
            out += [replace(self.to_answer(q, t, c, seconds), over_abstention=j in overruled)
                    for j, (q, t, c) in enumerate(zip(batch, trajectories, confidence))]
        return out

    # answer()'s steps after the hops, also for the server's continuous batch: the confidence is
    # P(ABSTAIN) after the prefix; where the threshold overrules the final answer's abstention, the
    # answer is generated again from the prefix.

    @staticmethod
    def prefix(t: Trajectory) -> list[int]:
        """The prompt and everything before the final answer: what its confidence is read after."""
        return t.prompt + t.tokens[:t.answer_start]

    def final_confidence(self, question: str, t: Trajectory, abstain_logp: float) -> float:
        """The confidence after the last hop, from log P(ABSTAIN) there (as answer() weighs it)."""
        return self.answerer.weigh(confidence_of(abstain_logp), question, t.documents)

    def overrules(self, t: Trajectory, confidence: float) -> bool:
        """The model's final answer is the abstention, but its confidence is at or above the threshold."""
        if self.threshold is None or below(confidence, self.threshold):
            return False
        text, _ = self.reply(t)
        return self.query_start not in text and parse_reply(text)[2]

    def instead(self, t: Trajectory, tokens: list[int], finish: str) -> Trajectory:
        """The trajectory with its final answer replaced by `tokens` (Answerer.answers_instead's, no stop token)."""
        stop = [self.renderer.stop_token] if finish == "stop" else []
        return replace(t, tokens=t.tokens[:t.answer_start] + tokens + stop,
                       written=t.written[:t.answer_start] + [1] * (len(tokens) + len(stop)), finish=finish)

    @property
    def threshold(self) -> float | None:
        return self.answerer.threshold

    def to_answer(self, question: str, t: Trajectory, confidence: float = float("nan"), seconds: float = 0.0) -> Answer:
        text, ok = self.reply(t)
        answer, citations, abstained = parse_reply(text)
        if self.query_start in text:  # ran out of tokens inside a query: no answer given
            answer, citations, abstained = ABSTAIN, [], True
        result = Answer(question, text, answer, citations, abstained, float(confidence), t.documents, 0, seconds,
                        hops=t.hops, format_ok=ok)
        if below(result.confidence, self.threshold):  # known only once the hops are done: the reply is withheld
            return replace(result, reply=ABSTAIN, answer=ABSTAIN, citations=[], abstained=True, below_threshold=True)
        return result
