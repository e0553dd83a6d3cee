"""Refrag's warm start (the first num_steps - rl_steps steps): 2-hop traces from the training split,

    question -> hop-1 documents (the gold first-hop document among retrieved distractors)
      -> the query: "[n] name", the hop-1 document naming the bridge entity, then its name (the
         title of gold_doc_ids[1]): the reading an answer does ("[n] answer"), so rag's skill carries over
      -> what retrieval finds for it, exactly as the engine's hook would (same fitting, same search)
      -> "[n] answer" citing the document that states it (ABSTAIN when it was not found)

stage.both_gold of the traces show both gold documents among hop 1's and answer at once, citing the
one that states the answer. Mixed with rag's single-hop examples (stage.single_hop of them), so the
model keeps answering at once when the first documents suffice. stage.bridge_questions of those ask
a trace's bridge question instead: the single-hop question about the trace's hop-1 document whose
answer is the name the trace queries ("Where does X live?" beside "In which country does X live?").
The same document, the same name read from it: only the question says whether that name is the
answer or a query, so the decision to query is learned from the question, not from how the documents
look. stage.needless_query of the other single-hop examples query anyway, for the answer they already
hold, and answer from the first documents: how to go on after a query that was not needed, without
teaching to open one (its opening marker is given, not learned).
Loss on what the model writes only: the queries and the reply, never the retrieved documents.
"""

from __future__ import annotations

import random
from functools import cached_property
from itertools import islice
from typing import Iterator, Sequence

from hybridchat.core.metrics import normalize_answer
from hybridchat.core.questions import Question
from hybridchat.core.seeds import EVALUATION, EXAMPLES, python_rng
from hybridchat.data.chat import collate, example_batches
from hybridchat.data.loader import Batch
from hybridchat.rag.answer import format_reply, parse_reply
from hybridchat.rag.multihop import Hop, MultiHop, NoQueries, QueryGenerator
from hybridchat.training.stages.rag import RagStage


class _CitingQuery(QueryGenerator):
    """A warm-start query written for the model: a name (the bridge entity's; for a needless query,
    the answer's), citing the hop-1 document it is read in (as an answer cites its source), once
    hop 1 shows that document."""

    def __init__(self, name: str, first_gold: str, cite_first: bool):
        self.name, self.first_gold, self.cite_first = name, first_gold, cite_first

    def query(self, question: str, hops: Sequence[Hop]) -> str | None:
        where = [n for n, d in enumerate(hops[0].documents, 1) if d.parent_id == self.first_gold]
        return format_reply(self.name, where[0], self.cite_first) if len(hops) == 1 and where else None


def bridge_questions(traces: Sequence[Question], single_hop: Sequence[Question], titles: dict[str, str]
                     ) -> list[Question]:
    """Each trace's bridge question where the single-hop questions hold one: answerable, its gold
    document the trace's first, its answer the title of the trace's second (the name the trace
    queries). A trace whose bridge fact nobody asks about has none."""
    asked = {(q.gold_doc_ids, normalize_answer(a)): q for q in single_hop if len(q.gold_doc_ids) == 1
             for a in q.answers}
    found = (asked.get(((t.gold_doc_ids[0],), normalize_answer(titles.get(t.gold_doc_ids[1], "")))) for t in traces)
    return [q for q in found if q is not None]


def _conversation(question: str, hops: Sequence[Hop], reply: str, learn_opening: bool = True) -> list[dict]:
    """The question with hop 1's documents, then a reply holding the later hops' queries and
    documents before its text (the renderer's messages)."""
    return [{"role": "user", "content": question, "documents": hops[0].documents},
            {"role": "assistant", "content": reply,
             "hops": [{"query": h.query, "documents": h.documents, "learn_opening": learn_opening} for h in hops[1:]]}]


class WarmStart:
    """The warm start's examples and batches. Items 0..len(hops)-1 are 2-hop traces, the next
    n_single are single-hop examples: the traces' bridge questions (stage.bridge_questions of them) and
    rag's, a different slice of each every epoch.

    rag: the refrag stage as the rag stage it extends (its config, single-hop questions and examples);
    planner: the engine without a model, which retrieves for a trace's query as inference would;
    titles: each knowledge-base document's title by parent id (a bridge entity's name)."""

    def __init__(self, rag: RagStage, hops: list[Question], val_hops: list[Question], n_single: int,
                 planner: MultiHop, titles: dict[str, str]):
        self.rag, self.config, self.seed = rag, rag.config, rag.ctx.config.seed
        self.hops, self.val_hops, self.n_single = hops, val_hops, n_single
        self.planner, self.titles = planner, titles
        self.bridges = bridge_questions(hops, rag.train_questions, titles) if self.config.bridge_questions else []

    def trace_messages(self, q: Question, rng: random.Random) -> list[dict]:
        """One 2-hop training conversation: the hop-1 documents with the first gold document at a
        random rank, the bridge query, its documents as the engine retrieves them, the cited answer."""
        c = self.config
        first_gold, answer_doc = q.gold_doc_ids[0], q.gold_doc_ids[-1]
        k = rng.randint(c.min_documents, c.max_documents)
        gold = [d for d in q.candidates if d.parent_id == first_gold][:1] or self._document(first_gold)
        docs = [d for d in q.candidates if d.parent_id not in q.gold_doc_ids][:k - 1]
        docs.insert(rng.randint(0, len(docs)), gold[0])
        if c.both_gold and rng.random() < c.both_gold:
            at_once = self.both_gold_messages(q, docs, rng)
            if at_once is not None:
                return at_once
        bridge = _CitingQuery(self.titles[q.gold_doc_ids[1]], first_gold, c.cite_first)
        hops = self.planner.plan(q.question, docs, bridge)
        shown = [d for h in hops for d in h.documents]
        where = [n for n, d in enumerate(shown, 1) if d.parent_id == answer_doc]
        reply = format_reply(q.answers[0], where[0], c.cite_first) if where and len(hops) > 1 else format_reply(None)
        return _conversation(q.question, hops, reply)

    def both_gold_messages(self, q: Question, docs: list, rng: random.Random) -> list[dict] | None:
        """The 2-hop question with its answer's document among hop 1's too (in place of a distractor,
        at a random rank): answered at once, citing it. None where it does not fit the context."""
        answer_doc = q.gold_doc_ids[-1]
        second = [d for d in q.candidates if d.parent_id == answer_doc][:1] or self._document(answer_doc)
        if not second:
            return None
        shown = list(docs)
        distractors = [i for i, d in enumerate(shown) if d.parent_id not in q.gold_doc_ids]
        if distractors:
            del shown[distractors[-1]]  # the lowest-ranked one: as many documents as the trace shows
        shown.insert(rng.randint(0, len(shown)), second[0])
        hops = self.planner.plan(q.question, shown, NoQueries())
        where = [n for n, d in enumerate(hops[0].documents, 1) if d.parent_id == answer_doc]
        if not where or not all(any(d.parent_id == g for d in hops[0].documents) for g in q.gold_doc_ids):
            return None
        return _conversation(q.question, hops, format_reply(q.answers[0], where[0], self.config.cite_first))

    def needless_query_messages(self, q: Question, rng: random.Random) -> list[dict] | None:
        """A single-hop conversation whose reply first queries the answer it already holds, then
        answers from where it read it: how to go on after a follow-up query that was not needed.
        The query's opening marker is given, not learned: the model is not taught to open one. None
        when rag's example for q would abstain."""
        docs, reply = self.rag.documents_and_reply(q, rng)
        _, cited, abstained = parse_reply(reply)
        if abstained:
            return None
        gold = docs[cited[0] - 1].parent_id
        hops = self.planner.plan(q.question, docs, _CitingQuery(q.answers[0], gold, self.config.cite_first))
        shown = [d for h in hops for d in h.documents]
        where = [n for n, d in enumerate(shown, 1) if d.parent_id in q.gold_doc_ids]
        reply = format_reply(q.answers[0], where[0], self.config.cite_first) if where else format_reply(None)
        return _conversation(q.question, hops, reply, learn_opening=False)

    def _document(self, parent_id: str):
        return [d for d in self.rag.ctx.knowledge_base.documents if d.parent_id == parent_id][:1]

    def example(self, i: int, epoch: int):
        """Item i of epoch `epoch` rendered: (token ids, loss mask)."""
        renderer = self.rag.renderer
        if i < len(self.hops):
            rng = python_rng(self.seed, EXAMPLES, "2-hop", epoch, i)
            return renderer.render(self.trace_messages(self.hops[i], rng))
        k = i - len(self.hops)
        if self.bridges:
            rng = python_rng(self.seed, EXAMPLES, "bridge", epoch, k)
            if rng.random() < self.config.bridge_questions:
                return self.rag.example(self.bridges[(k + epoch * self.n_single) % len(self.bridges)], rng)
        questions = self.rag.train_questions
        j = (k + epoch * self.n_single) % len(questions)
        rng = python_rng(self.seed, EXAMPLES, "needless-query", epoch, j)
        if rng.random() < self.config.needless_query:
            messages = self.needless_query_messages(questions[j], rng)
            if messages is not None:
                return renderer.render(messages)
        return self.rag.epoch_example(questions, j, epoch)

    def batches(self, start: int, end: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This rank's batches of global batch indices [start, end)."""
        rag = self.rag
        mine = sum(1 for i in range(start, end) if i % world_size == rank)
        return islice(example_batches(len(self.hops) + self.n_single, self.example, rag.ctx.config.gpu.micro_batch,
                                      self.seed, rag.renderer.pad_id, start, rank, world_size, rag.width_limit,
                                      self.config.length_grouping), mine)

    @cached_property
    def val_batches(self) -> list[Batch]:
        """Traces of the validation questions (eval_batches batches at most), the same every time."""
        size, pad_id = self.rag.ctx.config.gpu.micro_batch, self.rag.renderer.pad_id
        n = min(len(self.val_hops), size * self.config.eval_batches)
        examples = [self.rag.renderer.render(self.trace_messages(q, python_rng(self.seed, EVALUATION, "2-hop-validation", i)))
                    for i, q in enumerate(self.val_hops[:n])]
        return [collate(examples[i:i + size], pad_id) for i in range(0, n, size)]
