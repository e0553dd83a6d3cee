"""One worker thread owns the model; the replies being written decode together, continuously.

The model and its inference cache are not safe to share between threads, and decoding one request
at a time leaves a CPU (or GPU) mostly idle per token. So HTTP handlers only queue a Job, and the
worker keeps one DecodeBatch (model/engine.py). Between two decode steps it takes the jobs waiting
(as many as there is room for: batch_size replies at once), retrieves for them in one call,
prefills each prompt on its own and adds it to the batch; every step then decodes one token of
every reply, and a reply that finishes leaves the batch and is answered at once. A request that
arrives while others decode starts at the next step, not after them, and no reply waits for a
longer one. Events go back through each job's `send` as they happen: the sources shown, each piece
of the reply, then the finished Answer (or an error). A queue that is full refuses at once (Busy):
a client is better told to come back than left waiting behind an unbounded backlog.

Each reply takes the Answerer's steps (rag/answer.py): its confidence, read from the reply's own
prefill (below an abstention threshold: the abstention, nothing generated); the reply; where the
threshold overrules an abstention, the reply again without it (it rejoins the batch). Multi-hop
and rank-order replies (reading=rank_order) are not continuous: the model's queries are followed
inside the engine's own loop (rag/multihop.py), and which document answers is known only once all
are read (RankOrderReader), so such jobs taken together are answered in one call while the batch's
other replies wait.

Retrieval is batched too. /search requests call the same retriever from the server's threads, so the
retriever is wrapped in a lock (Locked) shared by both.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from hybridchat.model.engine import DecodeBatch, Decoding
from hybridchat.rag.answer import ABSTAIN, Answer, Answerer
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
    """A single-hop job being answered."""
    job: Job
    answerer: Answerer                   # the one for its reply length (the prompt's room depends on it)
    prompt: list[int]
    found: list | None                   # the documents retrieved; None: closed-book
    shown: list                          # those that fit the prompt
    stream: ReplyStream
    confidence: float | None = None
    seq: Decoding | None = None          # in the batch
    overruled: bool = False              # decoding again: the threshold overrules its abstention


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
    A multi-hop answer's hops are in its Done (its documents of every hop are its sources); it and a
    rank-order answer (reading=rank_order) come whole, as one delta."""

    def __init__(self, assistant: Assistant, batch_size: int, queue_size: int):
        retriever = None if assistant.retriever is None else Locked(assistant.retriever, threading.Lock())
        self.assistant = replace(assistant, retriever=retriever, batch_size=batch_size, _made={})
        self.batch_size = batch_size
        self.queue: queue.Queue[Job | None] = queue.Queue(queue_size)
        self.steps = 0                       # decode steps, and the replies they decoded: how much batching happened
        self.rows = 0
        self._thread = threading.Thread(target=self._work, name="hybridchat-batcher", daemon=True)

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

    def _take(self, room: int, wait: bool) -> tuple[list[Job], bool]:
        """(up to `room` jobs waiting, whether stop() was asked); with `wait`, blocks for the first."""
        jobs: list[Job] = []
        while len(jobs) < room:
            try:
                job = self.queue.get(block=wait and not jobs)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            if not job.cancelled:  # its client left while it waited
                jobs.append(job)
        return jobs, False

    def _work(self) -> None:
        batch = DecodeBatch(self.assistant.run.model, rows=self.batch_size)
        running: list[_Reply] = []
        stopping = False
        while running or not stopping:
            jobs: list[Job] = []
            try:
                if not stopping:
                    jobs, stopping = self._take(self.batch_size - len(running), wait=not running)
                    running += self._start(jobs, batch)
                for r in [r for r in running if r.job.cancelled]:  # its client left mid-reply
                    batch.cancel(r.seq)
                    running.remove(r)
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

    def _start(self, jobs: list[Job], batch: DecodeBatch) -> list[_Reply]:
        """Retrieve for the single-hop jobs and add their replies to the batch (multi-hop and
        rank-order ones are answered here, whole); the replies that joined or already finished."""
        # how a job with retrieval is answered whole, if it is: multi-hop, or its documents read alone
        # in rank order (a closed-book job, and one whose documents are read together, decodes in the batch)
        whole = None
        if self.assistant.multihop() is not None:
            whole = self._multihop
        elif self.assistant.reader() is not None:
            whole = self._rank_order
        groups: dict[int, list[Job]] = {}
        single = []
        for job in jobs:
            if whole is not None and job.retrieval:
                groups.setdefault(job.max_tokens, []).append(job)
            else:
                single.append(job)
        for max_tokens, group in groups.items():
            whole(group, max_tokens)

        asked = [j for j in single if j.retrieval]
        found: dict[int, list] = {}
        if asked:
            hits = self.assistant.retriever.search([j.question for j in asked], top_k=self.assistant.settings.top_k)
            found = {id(j): [h.document for h in row] for j, row in zip(asked, hits)}
        replies = []
        for job in single:
            answerer = self.assistant.answerer(job.max_tokens)
            documents = found.get(id(job))
            prompt, shown = answerer.prompt(job.question, documents)
            if documents is not None:
                job.send("sources", (shown, len(documents) - len(shown)))
            # Held back while a reply reads as the abstention: a threshold may replace it (rag/stream.py).
            stream = ReplyStream(answerer.tokenizer, hold_abstention=answerer.threshold is not None)
            replies.append(_Reply(job, answerer, prompt, documents, shown, stream))
        for r in replies:
            r.seq, r.confidence = r.answerer.decode(batch, r.prompt, on_token=self._streamer(r))
            if r.seq.finish_reason == "refused":  # below the threshold: nothing generated
                self._done(r, ABSTAIN)
        return [r for r in replies if r.seq.finish_reason != "refused"]

    @staticmethod
    def _streamer(r: _Reply) -> Callable[[int], None]:
        def on_token(token: int) -> None:
            if piece := r.stream.push(token):
                r.job.send("delta", piece)
        return on_token

    def _finish(self, running: list[_Reply], batch: DecodeBatch) -> list[_Reply]:
        """Answer the replies whose decoding finished (an overruled abstention decodes again
        instead); the ones still decoding."""
        finished = []
        for r in running:
            if r.seq.finish_reason is None:
                continue
            if not r.overruled and r.answerer.overrules(r.answerer.reply(r.seq.tokens)):
                r.overruled = True
                r.seq = r.answerer.decode_instead(batch, r.prompt)
                if r.seq.finish_reason is None:
                    continue
            finished.append(r)
        for r in finished:
            self._done(r, r.answerer.reply(r.seq.tokens))
        return [r for r in running if r not in finished]

    @staticmethod
    def _done(r: _Reply, reply: str) -> None:
        answer = r.answerer.to_answer(r.job.question, reply, r.confidence, r.found, r.shown,
                                      time.monotonic() - r.job.queued_at, r.overruled)
        if rest := r.stream.finish(answer.reply):
            r.job.send("delta", rest)
        refused = r.seq.finish_reason == "refused"
        tokens = len(r.answerer.tokenizer.encode(answer.reply)) if refused else len(r.seq.tokens)
        r.job.send("done", Done(answer, "closed-book" if r.found is None else "rag", tokens, len(r.prompt),
                                "length" if r.seq.finish_reason == "length" else "stop"))

    def _rank_order(self, jobs: list[Job], max_tokens: int) -> None:
        """reading=rank_order: which document answers is known once all are read, so replies come whole."""
        reader = self.assistant.reader(max_tokens)
        questions = [j.question for j in jobs]
        hits = self.assistant.retriever.search(questions, top_k=self.assistant.settings.top_k)
        answers = reader.answer(questions, [[h.document for h in row] for row in hits])
        for job, answer in zip(jobs, answers):
            job.send("sources", (answer.documents, answer.dropped))
            job.send("delta", answer.reply)
            tokens = len(reader.answerer.tokenizer.encode(answer.reply))
            prompt = sum(len(ids) for ids, _ in reader.prompts(answer.question, answer.documents))
            job.send("done", Done(answer, "rank-order", tokens, prompt))

    def _multihop(self, jobs: list[Job], max_tokens: int) -> None:
        """Multi-hop replies come whole: the model's queries are followed inside the engine's decode,
        and the answer's confidence is known only after the last hop (rag/multihop.py)."""
        multihop = self.assistant.multihop(max_tokens)
        answers = multihop.answer([j.question for j in jobs])
        for job, answer in zip(jobs, answers):
            job.send("sources", (answer.documents, 0))
            if answer.reply:
                job.send("delta", answer.reply)
            tokens = len(multihop.tokenizer.encode(answer.reply))
            prompt = len(multihop.prompt(answer.question, answer.hops[:1]))
            job.send("done", Done(answer, "multi-hop", tokens, prompt))
