"""One worker thread owns the model; the replies being written decode together, continuously.

The model and its inference cache are not safe to share between threads, and decoding one request
at a time leaves a CPU (or GPU) mostly idle per token. So HTTP handlers only queue a Job, and the
worker keeps one DecodeBatch (model/engine.py). Between two decode steps it takes the jobs waiting
(as many as there is room for: batch_size sequences at once, a job counted by the rows its reply may
take; one that does not fit waits, first in line, for the rows to free), retrieves for them in one call,
prefills each prompt on its own and adds it to the batch; every step then decodes one token of
every sequence, and a reply that finishes leaves the batch and is answered at once. A request that
arrives while others decode starts at the next step, not after them, and no reply waits for a
longer one. Events go back through each job's `send` as they happen: the sources shown, each piece
of the reply, then the finished Answer (or an error). A queue that is full refuses at once (Busy):
a client is better told to come back than left waiting behind an unbounded backlog.

Each reply takes the Answerer's steps (rag/answer.py): its confidence, read from the reply's own
prefill (below an abstention threshold: the abstention, nothing generated); the reply; where the
threshold overrules an abstention, the reply again without it (it rejoins the batch). The other
two ways of answering decode in the same batch, with their own modules' steps:
- multi-hop (rag/multihop.py's MultiHop): a reply is one sequence; when a step's token closes a
  query, the queries closed at that step are retrieved in one call and each reply's documents are
  fed to its own row (DecodeBatch.feed), which decodes on; its confidence is read after its last
  documents, and an overruled abstention decodes again from there;
- rank order (reading=rank_order, RankOrderReader): each document's prompt is a sequence of its own,
  prefilled alone with its confidence; with a threshold only the first that suffices is generated,
  without one every one decodes until an earlier document's reply answers; the reader decides.
Either reply comes whole (one piece, after its hops or once its documents are read): its final
text is known only then.

Retrieval is batched too. /search requests call the same retriever from the server's threads, so the
retriever is wrapped in a lock (Locked) shared by both.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from hybridchat.model.engine import DecodeBatch, Decoding
from hybridchat.rag.answer import ABSTAIN, Answer, Answerer, RankOrderReader
from hybridchat.rag.multihop import Hop, MultiHop, RowState, Trajectory
from hybridchat.rag.stream import ReplyStream
from hybridchat.training.answering import Assistant


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    question: str                        # fits the prompt already (the HTTP side checks)
    retrieval: bool                      # False: closed-book
    max_tokens: int                      # of the reply, at most the server's max_answer_tokens
    send: Callable[[str, Any], None]     # (event, payload): see Batcher
    cancelled: bool = False              # the client left: not answered, or taken out of the batch
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class Done:
    answer: Answer
    mode: str                            # closed-book | rag | rank-order | multi-hop
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str = "stop"          # "length": cut at max_tokens (OpenAI's names)


@dataclass(eq=False)
class _Reply:
    """A single-hop reply being answered, or (reading in rank order) one document's reply alone."""
    job: Job
    answerer: Answerer                   # the one for its reply length (the prompt's room depends on it)
    prompt: list[int]
    found: list | None                   # the documents retrieved; None: closed-book
    shown: list                          # those that fit the prompt
    stream: ReplyStream | None           # None: the reply comes whole (rank order)
    confidence: float | None = None
    seq: Decoding | None = None          # in the batch
    overruled: bool = False              # decoding again: the threshold overrules its abstention
    reading: _Reading | None = None      # rank order: the question it reads a document for

    def ended(self, batch: DecodeBatch) -> bool:
        """Its sequence has ended: whether the reply is final (False: the threshold overrules its
        abstention and it decodes again, without it)."""
        if not self.overruled and self.answerer.overrules(self.answerer.reply(self.seq.tokens)):
            self.overruled = True
            self.seq = self.answerer.decode_instead(batch, self.prompt)
        return self.seq.finish_reason is not None

    def answer(self) -> Answer:
        reply = ABSTAIN if self.seq.finish_reason == "refused" else self.answerer.reply(self.seq.tokens)
        return self.answerer.to_answer(self.job.question, reply, self.confidence, self.found, self.shown,
                                       time.monotonic() - self.job.queued_at, self.overruled)


@dataclass(eq=False)
class _Reading:
    """A question read in rank order: each document's reply alone (a _Reply each), decided by the reader."""
    job: Job
    reader: RankOrderReader
    documents: list                      # read, in rank order
    dropped: int
    reads: list[_Reply] = field(default_factory=list)             # per document, in rank order
    replies: list[Answer | None] = field(default_factory=list)   # per document; None: not (yet) generated
    decoding: list[_Reply] = field(default_factory=list)

    @property
    def confidences(self) -> list[float]:
        return [r.confidence for r in self.reads]

    def answer(self) -> Answer:
        return self.reader.decide(self.job.question, self.documents, self.dropped, self.confidences, self.replies,
                                  time.monotonic() - self.job.queued_at)


@dataclass(eq=False)
class _Hops:
    """A multi-hop reply being answered: one sequence, fed the documents found for each query it writes."""
    job: Job
    multihop: MultiHop                   # the one for its reply length
    prompt: list[int]
    state: RowState                      # its hops so far
    out: list[int] = field(default_factory=list)  # after the prompt: sampled and fed, as the engine's hook sees it
    seq: Decoding | None = None
    looked: int = 0                      # sampled tokens looked at for a query they close
    trajectory: Trajectory | None = None  # once its hops are done
    confidence: float = math.nan
    overruled: bool = False              # its final answer decodes again: the threshold overrules its abstention

    def asks(self) -> Hop | None:
        """The hop asked for by the query its newest sampled token closes, once per token (as the
        engine's query hook is called); None: none."""
        if self.seq.finish_reason is not None or len(self.seq.tokens) == self.looked:
            return None
        self.looked = len(self.seq.tokens)
        return self.multihop.written_query(self.state, self.out)

    def ended(self, batch: DecodeBatch) -> bool:
        """Its sequence has ended: whether the reply is final (False: its abstention is overruled
        and its final answer decodes again), as MultiHop.answer does after the hops."""
        mh = self.multihop
        if self.overruled:
            self.trajectory = mh.instead(self.trajectory, self.seq.tokens, self.seq.finish_reason)
            return True
        self.trajectory = mh.trajectory(0, self.prompt, self.state, self.out, self.seq.finish_reason)
        # read after its last documents (DecodeBatch.feed)
        self.confidence = mh.final_confidence(self.job.question, self.trajectory, self.seq.score)
        if not mh.overrules(self.trajectory, self.confidence):
            return True
        self.overruled = True
        self.seq = mh.answerer.decode_instead(batch, mh.prefix(self.trajectory))
        return self.seq.finish_reason is not None and self.ended(batch)

    def answer(self) -> Answer:
        answer = self.multihop.to_answer(self.job.question, self.trajectory, self.confidence,
                                         time.monotonic() - self.job.queued_at)
        return replace(answer, over_abstention=self.overruled)


class Locked:
    """A retriever whose search runs under a lock (the worker's retrievals and /search requests)."""

    def __init__(self, retriever, lock: threading.Lock):
        self.retriever, self.lock = retriever, lock

    def search(self, queries, top_k, filters=None):
        with self.lock:
            return self.retriever.search(queries, top_k=top_k, filters=filters)


class Batcher:
    """Events sent to a job: ("sources", (documents shown, how many were left out to fit the
    context)), ("delta", text) per piece of the reply, then ("done", Done) or ("error", message).
    A multi-hop reply sends ("hop", (Hop, documents shown so far)) for each query it writes, as
    retrieval answers it or it is refused, then its sources again if the hop found documents (all
    shown so far); its reply and a rank-order answer (reading=rank_order) come whole, as one delta."""

    def __init__(self, assistant: Assistant, batch_size: int, queue_size: int):
        retriever = None if assistant.retriever is None else Locked(assistant.retriever, threading.Lock())
        self.assistant = replace(assistant, retriever=retriever, batch_size=batch_size, _made={})
        self.batch_size = batch_size
        self.queue: queue.Queue[Job | None] = queue.Queue(queue_size)
        self.steps = 0                       # decode steps, and the replies they decoded: how much batching happened
        self.rows = 0
        self._thread = threading.Thread(target=self._work, name="hybridchat-batcher", daemon=True)
        self._next: Job | None = None        # taken from the queue, waiting for rows to free

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # The worker takes no more jobs and ends when the replies it is writing are done; jobs still
        # queued are never answered.
        while True:
            try:
                self.queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy from None

    def search(self, query: str, top_k: int):
        return self.assistant.retriever.search([query], top_k=top_k)[0]

    def rows_taken(self, job: Job) -> int:
        """Rows of the batch a job's reply may take at once: a rank-order reply without a threshold
        decodes one per document (the retriever's top_k at most), every other reply one."""
        reader = self.assistant.reader(job.max_tokens) if job.retrieval else None
        return self.assistant.settings.top_k if reader is not None and reader.answerer.threshold is None else 1

    def _take(self, room: int, idle: bool) -> tuple[list[Job], bool]:
        """(the jobs waiting, in order, whose rows fit in `room`, whether stop() was asked). With
        `idle` (nothing decoding) it blocks for the first, which is taken whatever its rows."""
        jobs: list[Job] = []
        while True:
            job, self._next = self._next, None
            if job is None:
                try:
                    job = self.queue.get(block=idle and not jobs)
                except queue.Empty:
                    return jobs, False
            if job is None:
                return jobs, True
            if job.cancelled:  # its client left while it waited
                continue
            need = self.rows_taken(job)
            if need > room and not (idle and not jobs):
                self._next = job
                return jobs, False
            jobs.append(job)
            room -= need

    def _work(self) -> None:
        batch = DecodeBatch(self.assistant.run.model, rows=self.batch_size)
        running: list[_Reply | _Hops] = []   # one per sequence in the batch
        stopping = False
        while running or not stopping:
            jobs: list[Job] = []
            try:
                if not stopping:
                    jobs, stopping = self._take(self.batch_size - len(running), idle=not running)
                    running += self._start(jobs, batch)
                for r in [r for r in running if r.job.cancelled]:  # its client left mid-reply
                    batch.cancel(r.seq)
                    running.remove(r)
                # every token a multi-hop reply samples is looked at before the step that feeds it
                self._follow([r for r in running if isinstance(r, _Hops)], batch)
                if len(batch):
                    self.steps, self.rows = self.steps + 1, self.rows + len(batch)
                    batch.step()
                running = self._finish(running, batch)
            except Exception as e:  # the model failed: the replies in hand end, the server goes on
                traceback.print_exc(file=sys.stderr)
                failed = {id(j): j for j in [r.job for r in running] + jobs}
                for job in failed.values():
                    job.send("error", f"the model failed on this request ({type(e).__name__}: {e})")
                batch, running = DecodeBatch(self.assistant.run.model, rows=self.batch_size), []

    def _start(self, jobs: list[Job], batch: DecodeBatch) -> list[_Reply | _Hops]:
        """Retrieve for the jobs (one call) and add their sequences to the batch: a multi-hop reply, a
        document's reply alone per document read in rank order, else a single-hop reply; the ones
        that joined or already finished."""
        asked = [j for j in jobs if j.retrieval]
        found: dict[int, list] = {}
        if asked:
            hits = self.assistant.retriever.search([j.question for j in asked], top_k=self.assistant.settings.top_k)
            found = {id(j): [h.document for h in row] for j, row in zip(asked, hits)}
        started: list[_Reply | _Hops] = []
        for job in jobs:
            documents = found.get(id(job))
            if documents is not None and (multihop := self.assistant.multihop(job.max_tokens)) is not None:
                started.append(self._hops(job, multihop, documents, batch))
            elif documents is not None and (reader := self.assistant.reader(job.max_tokens)) is not None:
                started += self._read(job, reader, documents, batch)
            else:
                started += self._single(job, documents, batch)
        return started

    def _single(self, job: Job, documents: list | None, batch: DecodeBatch) -> list[_Reply]:
        """The job's reply as a sequence of the batch (none where the threshold refuses it: answered at once)."""
        answerer = self.assistant.answerer(job.max_tokens)
        prompt, shown = answerer.prompt(job.question, documents)
        if documents is not None:
            job.send("sources", (shown, len(documents) - len(shown)))
        # Held back while a reply reads as the abstention: a threshold may replace it (rag/stream.py).
        r = _Reply(job, answerer, prompt, documents, shown,
                   ReplyStream(answerer.tokenizer, hold_abstention=answerer.threshold is not None))
        r.seq, r.confidence = answerer.decode(batch, job.question, (prompt, shown), on_token=self._streamer(r))
        if r.seq.finish_reason == "refused":  # below the threshold: nothing generated
            self._done(r)
            return []
        return [r]

    def _read(self, job: Job, reader: RankOrderReader, documents: list, batch: DecodeBatch) -> list[_Reply]:
        """reading=rank_order: each document's prompt prefilled alone, in rank order, with its
        confidence; the ones the reader generates (RankOrderReader.generated) join the batch."""
        read = reader.prompts(job.question, documents)
        reading = _Reading(job, reader, [d for _, d in read], len(documents) - len(read))
        job.send("sources", (reading.documents, reading.dropped))
        for k, (ids, document) in enumerate(read):
            r = _Reply(job, reader.answerer, ids, [document], [document], None, reading=reading)
            r.seq, r.confidence = reader.answerer.decode(
                batch, job.question, (ids, [document]),
                admit=lambda c, k=k: k in reader.generated(reading.confidences + [c]))
            reading.reads.append(r)
            reading.replies.append(None)
            if r.seq.finish_reason != "refused":
                reading.decoding.append(r)
        if not reading.decoding:  # nothing read, or nothing at or above the threshold
            self._read_done(reading)
        return list(reading.decoding)

    def _hops(self, job: Job, multihop: MultiHop, documents: list, batch: DecodeBatch) -> _Hops:
        """A multi-hop reply's sequence: hop 1's documents in its prompt (MultiHop.plan), its
        confidence scored from the start, then after each hop's documents."""
        hops = multihop.plan(job.question, documents)
        prompt = multihop.prompt(job.question, hops)
        r = _Hops(job, multihop, prompt, RowState(len(prompt), hops))
        job.send("sources", (hops[0].documents, 0))
        r.seq = batch.add(prompt, multihop.max_new_tokens, stop_tokens=[multihop.renderer.stop_token],
                          on_token=r.out.append, score=multihop.answerer.abstain_ids, paired_tokens=multihop.query_pair)
        return r

    def _follow(self, replies: list[_Hops], batch: DecodeBatch) -> None:
        """The multi-hop replies whose newest token closed a query: retrieve for their queries (one call
        per reply length), and feed each one's results section to its own row, which samples on (a
        token it samples after them may close another query: looked at in the next round)."""
        while asked := [(r, hop) for r in replies if (hop := r.asks()) is not None]:
            for multihop in {id(r.multihop): r.multihop for r, _ in asked}.values():
                mine = [(r, hop) for r, hop in asked if r.multihop is multihop]
                for (r, hop), found in zip(mine, multihop.retrieve([(r.state, hop) for r, hop in mine])):
                    injected = multihop.follow(r.state, r.out, hop, found)
                    r.out += injected
                    batch.feed(r.seq, injected, score=multihop.answerer.abstain_ids)
                    shown = [d for h in r.state.hops for d in h.documents]
                    r.job.send("hop", (hop, shown))
                    if hop.documents:
                        r.job.send("sources", (shown, 0))

    @staticmethod
    def _streamer(r: _Reply) -> Callable[[int], None]:
        def on_token(token: int) -> None:
            if piece := r.stream.push(token):
                r.job.send("delta", piece)
        return on_token

    def _finish(self, running: list[_Reply | _Hops], batch: DecodeBatch) -> list[_Reply | _Hops]:
        """Answer the replies whose sequences ended (one the threshold overrules decodes again
        instead); the ones still decoding."""
        gone: list[_Reply | _Hops] = []
        for r in running:
            if r in gone or r.seq.finish_reason is None or not r.ended(batch):  # gone: a document no longer read
                continue
            gone.append(r)
            if isinstance(r, _Hops):
                self._hops_done(r)
            elif r.reading is not None:
                gone += self._read_one(r, batch)
            else:
                self._done(r)
        return [r for r in running if r not in gone]

    @staticmethod
    def _done(r: _Reply) -> None:
        answer = r.answer()
        if rest := r.stream.finish(answer.reply):
            r.job.send("delta", rest)
        refused = r.seq.finish_reason == "refused"
        tokens = len(r.answerer.tokenizer.encode(answer.reply)) if refused else len(r.seq.tokens)
        r.job.send("done", Done(answer, "closed-book" if r.found is None else "rag", tokens, len(r.prompt),
                                "length" if r.seq.finish_reason == "length" else "stop"))

    def _read_one(self, r: _Reply, batch: DecodeBatch) -> list[_Reply]:
        """A document's reply alone is done: the documents after the one the answer is now read
        from cannot be read, so their replies leave the batch (returned); once every reply is in,
        the reader decides."""
        reading = r.reading
        reading.decoding.remove(r)
        reading.replies[reading.reads.index(r)] = r.answer()
        n = reading.reader.read_from(reading.replies)
        later = [] if n is None else [x for x in reading.decoding if reading.reads.index(x) >= n]
        for x in later:
            batch.cancel(x.seq)
            reading.decoding.remove(x)
        if not reading.decoding:
            self._read_done(reading)
        return later

    @staticmethod
    def _read_done(reading: _Reading) -> None:
        answer = reading.answer()
        reading.job.send("delta", answer.reply)
        tokens = len(reading.reader.answerer.tokenizer.encode(answer.reply))
        reading.job.send("done", Done(answer, "rank-order", tokens, sum(len(r.prompt) for r in reading.reads)))

    @staticmethod
    def _hops_done(r: _Hops) -> None:
        answer = r.answer()
        if answer.reply:
            r.job.send("delta", answer.reply)
        tokens = len(r.multihop.tokenizer.encode(answer.reply))
        r.job.send("done", Done(answer, "multi-hop", tokens, len(r.prompt)))
