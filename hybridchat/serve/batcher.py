"""One worker thread owns the model: requests wait in a bounded queue and decode together.

The model and its inference cache are not safe to share between threads, and decoding one request
at a time leaves a CPU (or GPU) mostly idle per token. So HTTP handlers only queue a Job; the worker
takes the first one waiting, lets others join it for batch_wait seconds (up to batch_size), and
answers them in one Answerer (or MultiHop, or RankOrderReader) call, where the engine decodes every
row of the batch in each forward. Events go back through each job's `send` as they happen: the
sources shown, each piece of the reply, then the finished Answer (or an error). A queue that is full refuses at once
(Busy): a client is better told to come back than left waiting behind an unbounded backlog.

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

from hybridchat.rag.answer import Answer
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
    cancelled: bool = False              # the client left: not answered if still waiting
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class Done:
    answer: Answer
    mode: str                            # closed-book | rag | rank-order | multi-hop
    completion_tokens: int
    prompt_tokens: int


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

    def __init__(self, assistant: Assistant, batch_size: int, queue_size: int, batch_wait_s: float):
        retriever = None if assistant.retriever is None else Locked(assistant.retriever, threading.Lock())
        self.assistant = replace(assistant, retriever=retriever, batch_size=batch_size, _made={})
        self.batch_size, self.batch_wait_s = batch_size, batch_wait_s
        self.queue: queue.Queue[Job | None] = queue.Queue(queue_size)
        self.batches = 0                     # answered batches, and their requests: how much batching happened
        self.batched_jobs = 0
        self._thread = threading.Thread(target=self._work, name="hybridchat-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # The worker ends after the batch it is decoding; jobs still queued are never answered.
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

    def _take(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_size:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # answer this batch, then stop
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            live = [j for j in batch if not j.cancelled]
            # how a job with retrieval is answered: multi-hop, its documents read alone in rank order, or
            # read together (as a closed-book job is answered)
            kind = self._single
            if self.assistant.multihop() is not None:
                kind = self._multihop
            elif self.assistant.reader() is not None:
                kind = self._rank_order
            groups: dict[tuple[Callable, int], list[Job]] = {}
            for job in live:  # one answering call per kind of answer and reply length
                groups.setdefault((kind if job.retrieval else self._single, job.max_tokens), []).append(job)
            for (answer, max_tokens), jobs in groups.items():
                try:
                    answer(jobs, max_tokens)
                    self.batches += 1
                    self.batched_jobs += len(jobs)
                except Exception as e:  # one batch's failure ends its requests, not the server
                    traceback.print_exc(file=sys.stderr)
                    for job in jobs:
                        job.send("error", f"the model failed on this request ({type(e).__name__}: {e})")

    def _single(self, jobs: list[Job], max_tokens: int) -> None:
        answerer = self.assistant.answerer(max_tokens)
        documents: list[list | None] = [None] * len(jobs)
        asked = [i for i, j in enumerate(jobs) if j.retrieval]
        if asked:
            hits = self.assistant.retriever.search([jobs[i].question for i in asked],
                                                   top_k=self.assistant.settings.top_k)
            for i, row in zip(asked, hits):
                documents[i] = [h.document for h in row]
        prompts = [answerer.prompt(j.question, d) for j, d in zip(jobs, documents)]
        for job, found, (_, shown) in zip(jobs, documents, prompts):
            if found is not None:
                job.send("sources", (shown, len(found) - len(shown)))
        # Held back while a reply reads as the abstention: a threshold may replace it (rag/stream.py).
        streams = [ReplyStream(answerer.tokenizer, hold_abstention=answerer.threshold is not None) for _ in jobs]

        def on_token(i: int, token: int) -> None:
            if piece := streams[i].push(token):
                jobs[i].send("delta", piece)

        answers = answerer.answer([j.question for j in jobs], documents, on_token=on_token)
        for job, stream, answer, found, (ids, _) in zip(jobs, streams, answers, documents, prompts):
            if rest := stream.finish(answer.reply):
                job.send("delta", rest)
            tokens = len(stream.tokens) or len(answerer.tokenizer.encode(answer.reply))
            job.send("done", Done(answer, "closed-book" if found is None else "rag", tokens, len(ids)))

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
