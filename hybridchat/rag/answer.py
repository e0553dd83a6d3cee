"""Answering a question from documents: the prompt, the reply format, generation and confidence.

One place for what the rag stage trains, and what its evaluation, the evaluator and the chat CLI
read back. A reply is either the number of the document the answer comes from, then the short
answer, "[2] Vellport", or the abstention ABSTAIN when the documents shown do not hold the answer.
Citing first splits the decision in the order a reader makes it: answer or abstain (the first
token), which document (the number), then a copy from that document, which the number marks.
Retrieval is the caller's: an Answerer is given the documents (or none: closed-book). It reads them
together, in one prompt (reading=together); a RankOrderReader reads each alone, in rank order, and
answers from the first that suffices (reading=rank_order).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from hybridchat.core.documents import Document
from hybridchat.core.metrics import exact_match, normalize_answer, token_f1
from hybridchat.data.chat import ChatRenderer
from hybridchat.model.engine import DecodeBatch, Decoding, Engine, TokenCallback
from hybridchat.rag.abstention import below
from hybridchat.rag.coverage import Coverage, evidence

ABSTAIN = "The documents do not say."
# Characters of a question tokenized per token of room: more than any run of tokens here averages, so
# a question is never cut shorter than its room (whitespace runs, the longest tokens, do not fill one).
CHARS_PER_TOKEN = 32
_CITATION = re.compile(r"\s*\[(\d+)\]\s*")
# How the documents retrieved for a question are read (the apps' `reading`): all in one prompt, or
# each alone in rank order (RankOrderReader).
TOGETHER, RANK_ORDER = "together", "rank_order"
READINGS = (TOGETHER, RANK_ORDER)


def format_reply(answer: str | None, citation: int | None = None, cite_first: bool = True) -> str:
    """The reply the model learns: its source's number and the answer ("[2] Vellport"), or with
    cite_first=False the answer and then its source ("Vellport [2]"); ABSTAIN for answer None."""
    if answer is None:
        return ABSTAIN
    if citation is None:
        return answer
    return f"[{citation}] {answer}" if cite_first else f"{answer} [{citation}]"


def parse_reply(reply: str) -> tuple[str, list[int], bool]:
    """(answer without citations, cited document numbers, abstained); citations anywhere, so either
    order of format_reply reads back."""
    citations = [int(n) for n in _CITATION.findall(reply)]
    answer = " ".join(_CITATION.sub(" ", reply).split())
    return answer, citations, answer == ABSTAIN


def fit_question(renderer: ChatRenderer, question: str, max_tokens: int) -> str:
    """The question, its end cut off where its prompt with an empty documents section would pass
    max_tokens. Only its first max_tokens * CHARS_PER_TOKEN characters are ever tokenized, so a 5 MB
    question costs what a fitting one does (it ran the model over a million tokens, memory growing
    past 12 GB)."""
    tokenizer = renderer.tokenizer
    room = max(0, max_tokens - len(renderer.prompt([{"role": "user", "content": "", "documents": []}])))
    head = question[:room * CHARS_PER_TOKEN]
    ids = tokenizer.encode(head)
    if head == question and len(ids) <= room:
        return question
    keep = room
    while True:
        # A cut inside a character decodes to U+FFFD, which can take more tokens than the piece it replaced.
        cut = tokenizer.decode(ids[:keep])
        if len(tokenizer.encode(cut)) <= room:
            return cut
        keep -= 1


def fit_prompt(renderer: ChatRenderer, question: str, documents: Sequence[Document] | None,
               max_tokens: int) -> tuple[list[int], list[Document]]:
    """The prompt and the documents it holds: the question cut to fit (fit_question), then the
    lowest-ranked documents dropped until it fits max_tokens (documents=None: closed-book, no
    documents section at all)."""
    question = fit_question(renderer, question, max_tokens)
    if documents is None:
        return renderer.prompt([{"role": "user", "content": question}]), []
    docs = list(documents)
    while True:
        ids = renderer.prompt([{"role": "user", "content": question, "documents": docs}])
        if len(ids) <= max_tokens or not docs:
            return ids, docs
        docs.pop()


@dataclass
class Answer:
    question: str
    reply: str                 # what the model wrote
    answer: str                # the reply without citations
    citations: list[int]       # document numbers cited, 1-based
    abstained: bool
    confidence: float          # 1 - P(the model writes ABSTAIN): high = sure the documents answer it
    documents: list[Document] = field(default_factory=list)  # as shown, after fitting the context
    dropped: int = 0           # lowest-ranked documents left out to fit the context
    seconds: float = 0.0       # wall time of this question's batch, per question
    closed_book: bool = False  # asked without a documents section
    hops: list = field(default_factory=list)  # multi-hop: the trace (multihop.Hop: query, documents), hop 1 first
    format_ok: bool = True     # multi-hop: every query followed, the reply closed, a valid citation or abstention
    # abstained because the confidence is below the abstention threshold (rag/abstention.py); the reply
    # is then ABSTAIN (single-hop: none was generated)
    below_threshold: bool = False
    # answered although the model wrote ABSTAIN: its confidence is at or above the threshold, so the
    # reply is its most likely one that does not begin as the abstention does
    over_abstention: bool = False
    # reading=rank_order: the number of the document the answer was read from (None: none sufficed),
    # and the confidence with each document alone, in rank order (None: the documents were read together)
    read: int | None = None
    read_confidences: list[float] | None = None

    @property
    def n_hops(self) -> int:
        """Retrievals made: 0 closed-book, 1 single-shot, one more per followed query."""
        if self.hops:
            return sum(h.status == "ok" for h in self.hops)
        return 0 if self.closed_book else 1

    @property
    def cited(self) -> list[Document]:
        return [self.documents[n - 1] for n in self.citations if 1 <= n <= len(self.documents)]


class Answerer:
    """threshold: answer exactly where the confidence is at or above it (rag/abstention.py): below it
    the reply is ABSTAIN and nothing is generated; at or above it a reply the model began as ABSTAIN is
    replaced by its best reply that does not. None: the model's own decision. coverage and
    coverage_exponent > 0: the confidence is weighed by the documents' coverage of the question
    (rag/coverage.py), confidence x coverage ** coverage_exponent, before anything compares it."""

    def __init__(self, model, tokenizer, max_context: int, max_answer_tokens: int = 24, batch_size: int = 32,
                 threshold: float | None = None, coverage: Coverage | None = None, coverage_exponent: float = 0.0):
        if coverage_exponent and coverage is None:
            raise ValueError("coverage_exponent > 0 needs the knowledge base's coverage")
        self.model, self.tokenizer = model, tokenizer
        self.renderer = ChatRenderer(tokenizer)
        self.max_context, self.max_answer_tokens, self.batch_size = max_context, max_answer_tokens, batch_size
        self.threshold = threshold
        self.coverage, self.coverage_exponent = coverage, coverage_exponent
        self.abstain_ids = tokenizer.encode(ABSTAIN) + [self.renderer.stop_token]

    @property
    def prompt_tokens(self) -> int:
        """The prompt's share of the context; the rest is the reply's."""
        return self.max_context - self.max_answer_tokens - 1

    def prompt(self, question: str, documents: Sequence[Document] | None) -> tuple[list[int], list[Document]]:
        return fit_prompt(self.renderer, question, documents, self.prompt_tokens)

    def fit_question(self, question: str) -> str:
        return fit_question(self.renderer, question, self.prompt_tokens)

    def weigh(self, confidence: float, question: str, documents: Sequence[Document]) -> float:
        """The confidence the decision compares, and an Answer reports: the model's, weighed by how
        much of the question the documents shown hold where the calibration chose so."""
        if not self.coverage_exponent:
            return confidence
        return evidence(confidence, self.coverage(question, documents), self.coverage_exponent)

    @torch.no_grad()
    def answer(self, questions: Sequence[str], documents: Sequence[Sequence[Document]] | None = None,
               on_token: TokenCallback | None = None) -> list[Answer]:
        """Greedy replies to every question (documents[i] for question i; None: closed-book).
        on_token(i, token) sees each token as it is sampled (i counts within a batch)."""
        out: list[Answer] = []
        for lo in range(0, len(questions), self.batch_size):
            batch = questions[lo:lo + self.batch_size]
            shown = [None] * len(batch) if documents is None else documents[lo:lo + self.batch_size]
            out += self.answer_batch(batch, shown, [self.prompt(q, d) for q, d in zip(batch, shown)], on_token)
        return out

    @torch.no_grad()
    def answer_batch(self, questions: Sequence[str], shown: Sequence[Sequence[Document] | None],
                     prompts: Sequence[tuple[list[int], list[Document]]], on_token: TokenCallback | None = None,
                     confidence: list[float] | None = None) -> list[Answer]:
        """Greedy replies to `prompts` (self.prompt(questions[i], shown[i]) each), all generated in
        one batch, each prompt through the model once: its confidence is read from the reply's own
        prefill, and a prompt below the threshold is refused there, nothing generated for it (the
        engine's score= and admit=). confidence: each prompt's, where the caller has it already;
        then only those at or above the threshold are generated for."""
        t0 = time.perf_counter()
        scored = confidence is None
        # scored: all are asked, and the engine refuses those below the threshold after their prefill
        asked = [i for i in range(len(questions)) if scored or self.generates(confidence[i])]
        replies = dict.fromkeys(range(len(questions)), ABSTAIN)  # what the threshold leaves ungenerated
        generated: list[int] = []
        if asked:
            def weighed(i: int, logp: float) -> float:
                return self.weigh(confidence_of(logp), questions[i], prompts[i][1])

            result = self._generate([prompts[i][0] for i in asked],
                                    None if on_token is None else lambda j, token: on_token(asked[j], token),
                                    admit=(lambda j, logp: self.generates(weighed(asked[j], logp))) if scored else None)
            if scored:
                confidence = [weighed(i, logp) for i, logp in zip(asked, result.scores)]
            for i, tokens, finish in zip(asked, result.tokens, result.finish_reasons):
                if finish != "refused":
                    generated.append(i)
                    replies[i] = self.reply(tokens)
        overruled = [i for i in generated if self.overrules(replies[i])]
        if overruled:
            result = self.answers_instead([prompts[i][0] for i in overruled])
            replies.update({i: self.reply(tokens) for i, tokens in zip(overruled, result.tokens)})
        seconds = (time.perf_counter() - t0) / len(questions)
        return [self.to_answer(q, replies[i], confidence[i], shown[i], docs, seconds, i in overruled)
                for i, (q, (_, docs)) in enumerate(zip(questions, prompts))]

    # The steps of answer(), each question's own, also for a caller that decodes them otherwise (the
    # server's continuous batch, serve/batcher.py): generate unless the confidence is below the
    # threshold; where the threshold overrules the reply, generate again without the abstention.

    def generates(self, confidence: float) -> bool:
        return not below(confidence, self.threshold)

    def reply(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens).strip()

    def overrules(self, reply: str) -> bool:
        return self.threshold is not None and parse_reply(reply)[2]

    def to_answer(self, question: str, reply: str, confidence: float, given: Sequence[Document] | None,
                  shown: list[Document], seconds: float, overruled: bool) -> Answer:
        """given: the documents retrieved (None: closed-book); shown: those that fit the prompt."""
        answer, citations, abstained = parse_reply(reply)
        return Answer(question, reply, answer, citations, abstained, confidence, shown,
                      (0 if given is None else len(given)) - len(shown), seconds, closed_book=given is None,
                      below_threshold=below(confidence, self.threshold), over_abstention=overruled)

    def decode(self, batch: DecodeBatch, question: str, prompt: tuple[list[int], list[Document]],
               on_token: Callable[[int], None] | None = None, admit: Callable[[float], bool] | None = None
               ) -> tuple[Decoding, float]:
        """(the reply to a prompt (self.prompt(question, ...): its ids and the documents shown) as one
        sequence of a running DecodeBatch, its confidence): the confidence is read from the reply's own
        prefill, and below the threshold (where admit, given the confidence, says no instead) the
        sequence is refused, nothing generated (its reply is then ABSTAIN)."""
        admit = admit or self.generates
        ids, shown = prompt
        seq = batch.add(ids, self.max_answer_tokens, stop_tokens=[self.renderer.stop_token], on_token=on_token,
                        score=self.abstain_ids, admit=lambda logp: admit(self.weigh(confidence_of(logp), question, shown)))
        return seq, self.weigh(confidence_of(seq.score), question, shown)

    def decode_instead(self, batch: DecodeBatch, prompt: list[int]) -> Decoding:
        """answers_instead's reply, as one sequence of a running DecodeBatch."""
        return batch.add(prompt, self.max_answer_tokens, stop_tokens=[self.renderer.stop_token],
                         begin_suppress_tokens=self.abstain_ids[:1])

    def _generate(self, prompts: Sequence[list[int]], on_token: TokenCallback | None = None,
                  suppress: Sequence[int] = (), admit: Callable[[int, float], bool] | None = None):
        """admit: result.scores holds log P(ABSTAIN | prompt), read from this generation's prefill,
        and prompt i is refused after it where admit(i, that log-probability) says no."""
        return Engine(self.model).generate(prompts, max_new_tokens=self.max_answer_tokens, temperature=0,
                                           stop_tokens=[self.renderer.stop_token], on_token=on_token,
                                           begin_suppress_tokens=suppress, score=self.abstain_ids if admit else (),
                                           admit=admit)

    def answers_instead(self, prompts: Sequence[list[int]]):
        """Greedy replies that do not begin as ABSTAIN does (its first token is ruled out): what the
        model answers where it would abstain but the threshold says to answer. A reply beginning with
        that token but going on otherwise ("The Beatles [2]") is never asked for again: only replies
        that are exactly ABSTAIN are. (Its own prefill: only the few overruled prompts.)"""
        return self._generate(prompts, suppress=self.abstain_ids[:1])

    def confidence(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        """1 - P(reply == ABSTAIN | prompt) per prompt: high = sure the documents answer it. For a
        caller that needs it before (or without) generating; answer() reads it from its own prefill."""
        return 1 - self.abstain_probability(prompts)

    def abstain_probability(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        """P(reply == ABSTAIN | prompt) per prompt (float64), teacher-forced: a scoring pass of the
        engine (score=, every row refused once scored), so the prompts share its batched prefill, no
        row is padded, and only the positions that predict the abstention reach the vocabulary head
        (full-vocabulary logits at every position of 32 prompts of 1,300 tokens exhausted 24 GB)."""
        result = Engine(self.model).generate(prompts, max_new_tokens=1, temperature=0, score=self.abstain_ids,
                                             admit=lambda i, logp: False)
        return torch.tensor(result.scores, dtype=torch.float64).exp()


def confidence_of(abstain_logp: float) -> float:
    """The confidence, 1 - P(ABSTAIN), of a reply whose log-probability of being ABSTAIN is given."""
    return 1 - math.exp(abstain_logp)


class RankOrderReader:
    """reading=rank_order: each document retrieved for a question is read alone, in rank order, and
    the answer is the one read from the first document the answerer does not abstain on (with a
    threshold: the first whose confidence alone is at or above it; without: the first where the
    model does not write ABSTAIN); ABSTAIN where none suffices. The citation is that document's
    number among those read. A question's confidence is its best document's: at or above the
    threshold exactly where some document suffices, so a threshold chosen on these answers means
    what it says. All (question, document) prompts of a batch of questions go through the model
    together, about the tokens of one prompt per question holding all its documents. Without a
    threshold all are generated for, each confidence read from its own prefill; with one the
    confidences come first (a scoring pass) and only the document chosen is generated for (its
    prompt prefilled a second time: one per question)."""

    def __init__(self, answerer: Answerer):
        self.answerer = answerer

    @property
    def threshold(self) -> float | None:
        return self.answerer.threshold

    def fit_question(self, question: str) -> str:
        return self.answerer.fit_question(question)

    def prompts(self, question: str, documents: Sequence[Document]) -> list[tuple[list[int], Document]]:
        """(prompt, document) for each document, in rank order, whose prompt with the question alone
        fits the context; one that does not is left out, as the lowest-ranked are when read together."""
        fitted = [self.answerer.prompt(question, [d]) for d in documents]
        return [(ids, shown[0]) for ids, shown in fitted if shown]

    @torch.no_grad()
    def answer(self, questions: Sequence[str], documents: Sequence[Sequence[Document]]) -> list[Answer]:
        answerer = self.answerer
        out: list[Answer] = []
        for lo in range(0, len(questions), answerer.batch_size):
            batch, given = questions[lo:lo + answerer.batch_size], documents[lo:lo + answerer.batch_size]
            t0 = time.perf_counter()
            read = [self.prompts(q, d) for q, d in zip(batch, given)]
            pairs = [(i, ids, d) for i, found in enumerate(read) for ids, d in found]  # question, prompt, document
            mine = [[k for k, pair in enumerate(pairs) if pair[0] == i] for i in range(len(batch))]
            confidence, replies = self._read(batch, pairs, mine)
            seconds = (time.perf_counter() - t0) / len(batch)
            for i, (q, found) in enumerate(zip(batch, read)):
                out.append(self.decide(q, [d for _, d in found], len(given[i]) - len(found),
                                       [confidence[k] for k in mine[i]], [replies.get(k) for k in mine[i]], seconds))
        return out

    def _read(self, batch: Sequence[str], pairs: list[tuple[int, list[int], Document]], mine: list[list[int]]
              ) -> tuple[list[float], dict[int, Answer]]:
        """(each pair's confidence, the answers read by pair index; mine[i]: question i's pairs):
        without a threshold every pair is generated for, its confidence read from its own prefill;
        with one the confidences come first (a scoring pass), and only the pairs `generated` picks."""
        def answer(asked: list[int], confidence: list[float] | None = None) -> dict[int, Answer]:
            return dict(zip(asked, self.answerer.answer_batch(
                [batch[pairs[k][0]] for k in asked], [[pairs[k][2]] for k in asked],
                [(pairs[k][1], [pairs[k][2]]) for k in asked], confidence=confidence))) if asked else {}

        if self.threshold is None:
            replies = answer(list(range(len(pairs))))
            return [replies[k].confidence for k in range(len(pairs))], replies
        alone = self.answerer.confidence([ids for _, ids, _ in pairs]).tolist() if pairs else []
        confidence = [self.answerer.weigh(c, batch[i], [d]) for (i, _, d), c in zip(pairs, alone)]
        asked = sorted(ks[j] for ks in mine for j in self.generated([confidence[k] for k in ks]))
        return confidence, answer(asked, [confidence[k] for k in asked])

    # answer()'s decisions, also for a caller that reads each document as a sequence of its own (the
    # server's continuous batch, serve/batcher.py).

    def generated(self, confidences: Sequence[float]) -> list[int]:
        """Which documents' replies are generated, by the confidences with each alone (in rank order):
        with a threshold only the first at or above it; without, every one (which suffices is known
        from its reply)."""
        if self.threshold is None:
            return list(range(len(confidences)))
        return next(([k] for k, c in enumerate(confidences) if self.answerer.generates(c)), [])

    @staticmethod
    def read_from(replies: Sequence[Answer | None]) -> int | None:
        """The number of the document the answer is read from: the first, in rank order, whose reply
        alone does not abstain (None for a document not generated)."""
        return next((n for n, r in enumerate(replies, 1) if r is not None and not r.abstained), None)

    def decide(self, question: str, documents: list[Document], dropped: int, confidences: list[float],
               replies: Sequence[Answer | None], seconds: float) -> Answer:
        """The question's Answer, from each document's reply alone (None: not generated), read from
        the first that suffices (read_from), or ABSTAIN."""
        best = math.nan if any(math.isnan(c) for c in confidences) else max(confidences, default=0.0)
        n = self.read_from(replies)
        if n is None:
            return Answer(question, ABSTAIN, ABSTAIN, [], True, best, documents, dropped, seconds,
                          below_threshold=below(best, self.threshold), read_confidences=confidences)
        alone = replies[n - 1]
        # The model saw one document, [1]: its citations name the document's number among all.
        reply = _CITATION.sub(lambda m: m.group(0).replace(m.group(1), str(n)), alone.reply)
        return Answer(question, reply, alone.answer, [n], False, best, documents, dropped, seconds,
                      over_abstention=alone.over_abstention, read=n, read_confidences=confidences)


def holds(document: Document, answer: str) -> bool:
    """Whether the document's text states the answer (normalised containment)."""
    needle = normalize_answer(answer)
    return bool(needle) and f" {needle} " in f" {normalize_answer(document.text)} "


def score(answer: Answer, answers: Sequence[str], gold_doc_ids: Sequence[str] = ()) -> dict[str, float | None]:
    """Per-question scores; None where a score does not apply (citation accuracy is only defined on
    correct answers, false abstention only on answerable questions, ...). Empty `answers` means the
    question is unanswerable: abstaining is right, any answer is a hallucination."""
    answerable = bool(answers)
    correct = answerable and not answer.abstained and exact_match(answer.answer, answers) == 1.0
    gold = set(gold_doc_ids)
    return {
        "em": float(correct) if answerable else None,
        "f1": (0.0 if answer.abstained else token_f1(answer.answer, answers)) if answerable else None,
        "hallucination": float(not answer.abstained and not correct),
        "abstain": float(answer.abstained),
        "false_abstention": float(answer.abstained) if answerable else None,
        "citation": float(any(holds(d, a) for d in answer.cited for a in answers)) if correct else None,
        "gold_in_context": (float(any(d.parent_id in gold for d in answer.documents))
                            if gold and not answer.closed_book else None),
        "all_gold_in_context": (float(gold <= {d.parent_id for d in answer.documents})
                                if gold and not answer.closed_book else None),
        "hops": float(answer.n_hops),
        "malformed": float(not answer.format_ok),
        "seconds": answer.seconds,
        "confidence": answer.confidence,
    }
