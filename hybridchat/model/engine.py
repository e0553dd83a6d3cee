"""Generation: prefill, token-by-token decode, sampling, batching.

Every row of a batch shares one cache position (`InferenceCache.pos`), so rows advance in lockstep
and a row only ever sees its own real tokens. That rules out left padding: a pad token would flow
through Mamba's conv and state and change them (attention could mask it, the SSM cannot). Instead
each row keeps a queue of "pending" tokens that must be fed before it samples again:

- at the start it is the prompt; all rows share one chunked prefill of their common length, and a
  row whose prompt is longer keeps feeding its own prompt while shorter ones already sample;
- after a sample it is that one token, plus whatever a query hook injects (retrieved text).

When a row's prompt is all fed, `score=` reads the log-probability of a continuation (the
answerer's abstention) from that very prefill: the last logits predict its first token, and one
forward of the rest on a copy of the row's cache (`score_continuation`) the others, so the prompt
goes through the model once, and `admit=` may refuse the row before it samples anything.

Each step feeds T = the shortest pending queue (capped at `prefill_chunk`) tokens of every row in
one forward, so prefill, staggered prompts and injected documents are all the same loop. Prompts
are grouped by length (spread at most `max_length_spread` tokens) so a short prompt never waits
for a long one token by token. Rows that finish are dropped from the batch and from the cache.

That suits a fixed set of prompts known up front (evaluation, training rollouts). A server's
requests arrive while others decode: `DecodeBatch` is continuous batching for them. Each new
request is prefilled on its own (batch 1, its own cache) and then joins the running batch between
two steps, its state copied in as one more row of a ragged cache (model/cache.py: each row keeps
its own length, attention masks the rest, Mamba's state is per row anyway); every step is one
forward of one token for every row, and a row that finishes leaves at once. The batch's rows are
preallocated and reused, so a join or a leave copies one row, not the whole cache. Tokens a row is
shown mid-decode (a multi-hop reply's retrieved documents) are fed to that row alone (`feed`), as
a joining prompt is prefilled.

`paired_tokens=(opening, closing)`: the closing token is only sampled inside what an opening began
(the latest of the two sampled is the opening): a multi-hop reply's query end marker closes a query,
never a reply that did not open one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from hybridchat.model.cache import InferenceCache

# on_token(sequence_index, token): called for each sampled token, as soon as it is sampled.
TokenCallback = Callable[[int, int], None]
# query_hook(sequence_index, tokens_after_prompt) -> tokens to feed before sampling again, or None.
QueryHook = Callable[[int, list[int]], Optional[Sequence[int]]]


def opened(tokens: Sequence[int], pair: tuple[int, int]) -> bool:
    """Whether the latest of pair's tokens among `tokens` is the opening one."""
    for t in reversed(tokens):
        if t == pair[0] or t == pair[1]:
            return t == pair[0]
    return False


def close_only_opened(logits: torch.Tensor, outputs: Sequence[Sequence[int]], pair: tuple[int, int] | None) -> torch.Tensor:
    """logits (one row per output) with pair's closing token ruled out in every row whose output has
    not opened it (a copy, where any is)."""
    if pair is None:
        return logits
    shut = [j for j, out in enumerate(outputs) if not opened(out, pair)]
    if not shut:
        return logits
    logits = logits.clone()
    logits[shut, pair[1]] = -float("inf")
    return logits


@torch.no_grad()
def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V). temperature 0 is greedy; top_k keeps the k most
    likely tokens; top_p keeps the smallest set whose probability reaches p (always >= 1 token)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens strictly more likely already reach top_p.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def score_continuation(model: torch.nn.Module, logits: torch.Tensor, cache: InferenceCache,
                       continuation: Sequence[int]) -> list[float]:
    """log P(continuation | each row's tokens so far), teacher-forced as a full forward over prompt +
    continuation would score it, from a prefill already done: `logits` (B, V), its last position's,
    predict the continuation's first token; one forward of all but its last token on `cache` (B rows,
    consumed: pass a copy) predicts the rest. Only those positions reach the vocabulary head. In at
    least float32 (bf16 logits lose the small probabilities)."""
    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32)).log_softmax(-1)

    logp = log_softmax(logits)[:, continuation[0]]
    if len(continuation) > 1:
        ids = torch.tensor([list(continuation[:-1])] * logits.size(0), dtype=torch.long, device=logits.device)
        rest = log_softmax(model(ids, cache=cache))
        target = torch.tensor(continuation[1:], device=logits.device).expand(logits.size(0), -1)
        logp = logp + rest.gather(-1, target[..., None]).squeeze(-1).sum(-1)
    return logp.tolist()


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per sequence: what followed the prompt (sampled + injected, no stop token)
    # "stop" (a stop token was sampled), "length" or "refused" (`admit` turned it away; nothing sampled)
    finish_reasons: list[str]
    prompt_tokens: int = 0
    generated_tokens: int = 0  # sampled tokens, all sequences
    cache_bytes: int = 0  # largest cache allocated (KV preallocated to its max_len)
    prefill_seconds: float = 0.0  # shared prefill of the prompts
    decode_seconds: float = 0.0  # everything after it
    scores: list[Optional[float]] = field(default_factory=list)  # per sequence: log P(`score` | prompt)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def cache_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    # The cache holds activations: under autocast they are in the autocast dtype.
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


@dataclass
class _Scoring:
    continuation: list[int]  # empty: nothing scored
    admit: Callable[[int, float], bool] | None
    num_samples: int


@dataclass
class _Row:
    seq: int  # index into the result
    pending: list[int]  # tokens to feed before the next sample
    out: list[int] = field(default_factory=list)
    sampled: int = 0


class Engine:
    def __init__(self, model: torch.nn.Module, prefill_chunk: int = 512, max_length_spread: int = 64,
                 max_batch_size: int | None = None):
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.max_length_spread = max_length_spread
        self.max_batch_size = max_batch_size

    def _cache_dtype(self, device: torch.device) -> torch.dtype:
        return cache_dtype(self.model, device)

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        for i in order:
            g = groups[-1] if groups else None
            if (g is None or lengths[i] - lengths[g[0]] > self.max_length_spread
                    or (self.max_batch_size is not None and len(g) >= self.max_batch_size)):
                groups.append([i])
            else:
                g.append(i)
        return groups

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens: Iterable[int] = (),
                 num_samples: int = 1, seed: int | None = None, on_token: TokenCallback | None = None,
                 query_hook: QueryHook | None = None, extra_len: int = 0,
                 begin_suppress_tokens: Iterable[int] = (), score: Sequence[int] = (),
                 admit: Callable[[int, float], bool] | None = None,
                 paired_tokens: tuple[int, int] | None = None) -> GenerationResult:
        """Generate up to max_new_tokens sampled tokens for every prompt, num_samples times each.
        Sequence i * num_samples + s is sample s of prompt i. `extra_len` reserves cache room for
        tokens a query_hook injects (attention layers only; a row that runs out finishes "length").
        begin_suppress_tokens are never the first token sampled (e.g. the first token of a reply the
        caller rules out).

        score: a continuation whose log-probability after each prompt goes to result.scores, read
        from the generation's own prefill (module docstring), not from a second pass over the
        prompt; admit(i, score) False refuses that sequence of prompt i before it samples (finish
        "refused", no tokens). admit=lambda i, s: False makes it a scoring pass that generates nothing.
        paired_tokens: (opening, closing), the closing one sampled only after an opening (module docstring)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        n_seq = len(prompts) * num_samples
        result = GenerationResult(tokens=[[] for _ in range(n_seq)], finish_reasons=["length"] * n_seq,
                                  prompt_tokens=sum(len(p) for p in prompts), scores=[None] * n_seq)
        opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        stops = set(stop_tokens)
        suppressed = sorted(set(begin_suppress_tokens))
        scoring = _Scoring(list(score), admit, num_samples)
        was_training = self.model.training
        self.model.eval()
        try:
            for group in self._groups([len(p) for p in prompts]):
                self._generate_group([list(prompts[i]) for i in group], group, max_new_tokens, num_samples,
                                     stops, suppressed, paired_tokens, scoring, opts, on_token, query_hook, extra_len,
                                     device, result)
        finally:
            self.model.train(was_training)
        return result

    def _generate_group(self, prompts, prompt_ids, max_new_tokens, num_samples, stops, suppressed, pair, scoring,
                        opts, on_token, query_hook, extra_len, device, result: GenerationResult) -> None:
        model = self.model
        # room after the longest prompt for its reply, and for the scored continuation on a copy
        capacity = max(len(p) for p in prompts) + max(max_new_tokens, len(scoring.continuation)) + extra_len
        cache = model.allocate_cache(len(prompts), capacity, dtype=self._cache_dtype(device))
        result.cache_bytes = max(result.cache_bytes, cache.nbytes() * num_samples)

        # Shared prefill of the common prefix length, once per prompt (not per sample). At least one
        # token of every prompt stays pending so the first step produces the logits to sample from.
        t0 = time.perf_counter()
        common = min(len(p) for p in prompts) - 1
        if common > 0:
            idx = torch.tensor([p[:common] for p in prompts], dtype=torch.long, device=device)
            for start in range(0, common, self.prefill_chunk):
                model(idx[:, start:start + self.prefill_chunk], cache=cache, last_only=True)
        if num_samples > 1:
            cache = cache.expand(num_samples)
        rows = [_Row(seq=pid * num_samples + s, pending=p[common:])
                for pid, p in zip(prompt_ids, prompts) for s in range(num_samples)]
        t1 = time.perf_counter()
        result.prefill_seconds += t1 - t0

        while rows:
            T = min(min(len(r.pending) for r in rows), self.prefill_chunk, capacity - cache.pos)
            if T == 0:
                break  # cache full: the remaining rows finish with "length"
            idx = torch.tensor([r.pending[:T] for r in rows], dtype=torch.long, device=device)
            logits = model(idx, cache=cache, last_only=True)[:, -1]
            for r in rows:
                r.pending = r.pending[T:]
            ready = [i for i, r in enumerate(rows) if not r.pending]
            finished = set()
            fresh = [i for i in ready if rows[i].sampled == 0]  # their prompt has just been fed
            if scoring.continuation and fresh:
                finished = self._score(scoring, fresh, rows, logits, cache, result)
                ready = [i for i in ready if i not in finished]
            if ready:
                step = logits[ready]
                first = [j for j, i in enumerate(ready) if rows[i].sampled == 0]
                if suppressed and first:
                    step = step.clone()
                    step[torch.tensor(first, device=device)[:, None], torch.tensor(suppressed, device=device)] = -float("inf")
                step = close_only_opened(step, [rows[i].out for i in ready], pair)
                tokens = sample(step, **opts).tolist()
                for i, tok in zip(ready, tokens):
                    r = rows[i]
                    if tok in stops:
                        result.finish_reasons[r.seq] = "stop"
                        finished.add(i)
                        continue
                    r.out.append(tok)
                    r.sampled += 1
                    result.generated_tokens += 1
                    if on_token is not None:
                        on_token(r.seq, tok)
                    if r.sampled >= max_new_tokens:
                        finished.add(i)
                        continue
                    injected = list((query_hook(r.seq, r.out) if query_hook is not None else None) or [])
                    r.out.extend(injected)
                    r.pending = [tok] + injected
            if finished:
                for i in finished:
                    result.tokens[rows[i].seq] = rows[i].out
                keep = [i for i in range(len(rows)) if i not in finished]
                rows = [rows[i] for i in keep]
                if rows:
                    cache = cache.select(keep)
        for r in rows:
            result.tokens[r.seq] = r.out
        result.decode_seconds += time.perf_counter() - t1

    def _score(self, scoring: _Scoring, fresh: list[int], rows: list[_Row], logits: torch.Tensor,
               cache: InferenceCache, result: GenerationResult) -> set[int]:
        """Score the continuation after the rows `fresh` (indices into rows, their prompts just fed:
        the cache holds exactly their prompt) on a copy of their cache rows; returns those refused."""
        refused = set()
        scores = score_continuation(self.model, logits[fresh], cache.select(fresh), scoring.continuation)
        for i, logp in zip(fresh, scores):
            result.scores[rows[i].seq] = logp
            if scoring.admit is not None and not scoring.admit(rows[i].seq // scoring.num_samples, logp):
                result.finish_reasons[rows[i].seq] = "refused"
                refused.add(i)
        return refused


@dataclass(eq=False)  # each is its own sequence, however alike two are
class Decoding:
    """One sequence of a DecodeBatch: what it was asked, what it sampled so far (no stop token) and,
    once it has left the batch, why: "stop" (a stop token), "length", "cancelled" or "refused"
    (`admit` turned it away after its prefill; nothing sampled)."""
    prompt: list[int]
    max_new_tokens: int
    stop_tokens: frozenset[int]
    on_token: Optional[Callable[[int], None]] = None
    paired_tokens: Optional[tuple[int, int]] = None  # (opening, closing): module docstring
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    score: Optional[float] = None  # log P(the continuation `add` or `feed` was asked to score | what came before)
    fed: int = 0  # tokens `feed` gave it (not sampled, not in `tokens`)

    @property
    def capacity(self) -> int:  # the cache positions it may fill: its prompt, the tokens fed, every sample fed back
        return len(self.prompt) + self.fed + self.max_new_tokens


class DecodeBatch:
    """Continuous batching (module docstring): sequences join with `add` and decode together, one
    token each per `step`; a finished or cancelled one leaves at once. Sampling options are the
    batch's; stop tokens, lengths and first-token suppression are each sequence's. Greedy
    (temperature 0) gives every sequence exactly the tokens it gets alone. Puts the model in eval
    mode; one thread at a time.

    The rows live in a preallocated cache (`slots`, `rows` of them to begin with, e.g. a server's
    batch size); the batch decodes through a view of its first len(batch) rows. A joining sequence's
    state is copied into the next free row; a leaving one's row takes the last row's state, so the
    rows stay contiguous and one row is copied, not all. Only a sequence that needs more rows or a
    longer row than any before makes a new, larger allocation (rows doubled, length rounded up)."""

    def __init__(self, model: torch.nn.Module, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, prefill_chunk: int = 512, rows: int = 1):
        self.model = model.eval()
        self.prefill_chunk = prefill_chunk
        self.initial_rows = max(rows, 1)
        self.device = next(model.parameters()).device
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        self.options = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.rows: list[Decoding] = []
        self.slots: InferenceCache | None = None  # preallocated rows
        self.cache: InferenceCache | None = None  # a view of slots' first len(rows) rows, with their lengths

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, prompt: Sequence[int], max_new_tokens: int, *, stop_tokens: Iterable[int] = (),
            begin_suppress_tokens: Iterable[int] = (), on_token: Callable[[int], None] | None = None,
            score: Sequence[int] = (), admit: Callable[[float], bool] | None = None,
            paired_tokens: tuple[int, int] | None = None) -> Decoding:
        """Prefill the prompt on its own and sample its first token (begin_suppress_tokens ruled
        out), then join the batch, unless that token already ends it. on_token(token) sees each
        sampled token at once. The batch's other rows wait for this prefill: one forward per
        prefill_chunk tokens of the prompt.

        score: a continuation whose log-probability after the prompt goes to seq.score, read from
        this prefill (one forward of its own length on a copy of the row's cache), not from a
        second pass over the prompt; admit(seq.score) False refuses the sequence before sampling.
        paired_tokens: (opening, closing), the closing one sampled only after an opening (module docstring)."""
        if not prompt or max_new_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token and max_new_tokens >= 1")
        seq = Decoding(list(prompt), max_new_tokens, frozenset(stop_tokens), on_token, paired_tokens)
        cache = self.model.allocate_cache(1, len(seq.prompt) + max(max_new_tokens, len(score)),
                                          dtype=cache_dtype(self.model, self.device))
        logits = self._prefill(cache, seq.prompt)
        if score:
            seq.score = self._score(logits, cache, list(score))
            if admit is not None and not admit(seq.score):
                seq.finish_reason = "refused"
                return seq
        suppressed = sorted(set(begin_suppress_tokens))
        if suppressed:
            logits = logits.clone()
            logits[:, suppressed] = -float("inf")
        self._take(seq, self._sample(logits, [seq]).item())
        if seq.finish_reason is None:
            self._join(seq, cache)
        return seq

    @torch.inference_mode()
    def feed(self, seq: Decoding, tokens: Sequence[int], *, score: Sequence[int] = ()) -> None:
        """Feed `tokens` to one sequence of the batch after its last sampled token (the documents
        retrieved for a query it wrote), then sample its next token; it leaves the batch if that
        ends it. Its row is prefilled with them alone, as a joining prompt is (the other rows wait
        for one forward per prefill_chunk tokens), in a one-row cache holding a copy of the row,
        which then takes the row's place. score: as `add`'s, after the tokens (seq.score is replaced)."""
        i = self.rows.index(seq)
        held, fed = self.cache.lengths[i], [seq.tokens[-1], *tokens]
        cache = self.model.allocate_cache(1, held + len(fed) + len(score), dtype=cache_dtype(self.model, self.device))
        cache.put(0, self.cache, i)
        cache.advance(held)  # put copied the row's tokens: the one-row cache holds them
        logits = self._prefill(cache, fed)
        if score:
            seq.score = self._score(logits, cache, list(score))
        seq.fed += len(tokens)
        if seq.capacity > self.slots.max_len:
            self._grow(len(self.rows), seq.capacity)
        self.slots.put(i, cache)
        lengths = list(self.cache.lengths)
        lengths[i] += len(fed)
        self.cache = self.slots.head(len(self.rows), lengths)
        self._take(seq, self._sample(logits, [seq]).item())
        self._leave()

    def _prefill(self, cache: InferenceCache, tokens: list[int]) -> torch.Tensor:
        """Feed tokens to a one-row cache, prefill_chunk at a time; the last one's logits (1, V)."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        for start in range(0, len(tokens), self.prefill_chunk):
            logits = self.model(ids[:, start:start + self.prefill_chunk], cache=cache, last_only=True)
        return logits[:, -1]

    def _join(self, seq: Decoding, cache: InferenceCache) -> None:
        n = len(self.rows)
        if self.slots is None or n == self.slots.batch_size or seq.capacity > self.slots.max_len:
            self._grow(n + 1, seq.capacity)
        self.slots.put(n, cache)
        self.rows.append(seq)
        self.cache = self.slots.head(n + 1, (self.cache.lengths if n else []) + cache.row_lengths())

    def _grow(self, rows: int, max_len: int) -> None:
        old = self.slots
        if old is not None:
            rows = old.batch_size if rows <= old.batch_size else max(rows, 2 * old.batch_size)
            max_len = max(max_len, old.max_len)
        rows = max(rows, self.initial_rows)
        # rounded up, so that prompts a few tokens longer than the last do not each reallocate
        self.slots = self.model.allocate_cache(rows, -(-max_len // 64) * 64, dtype=cache_dtype(self.model, self.device))
        for i in range(len(self.rows)):
            self.slots.put(i, self.cache, i)

    @torch.inference_mode()
    def step(self) -> list[Decoding]:
        """One forward of every row's last token; each samples its next. Returns the rows that
        finished (they have left the batch)."""
        if not self.rows:
            return []
        idx = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        logits = self.model(idx, cache=self.cache, last_only=True)[:, -1]
        for row, token in zip(self.rows, self._sample(logits, self.rows).tolist()):
            self._take(row, token)
        finished = [r for r in self.rows if r.finish_reason is not None]
        self._leave()
        return finished

    def _sample(self, logits: torch.Tensor, rows: Sequence[Decoding]) -> torch.Tensor:
        """One token per row of logits (rows: their sequences), each one's closing token ruled out
        where it has not opened it."""
        for j, r in enumerate(rows):
            if r.paired_tokens is not None and not opened(r.tokens, r.paired_tokens):
                logits[j, r.paired_tokens[1]] = -float("inf")
        return sample(logits, **self.options)

    def _score(self, logits: torch.Tensor, cache: InferenceCache, continuation: list[int]) -> float:
        # the one-row cache goes on to decode: the continuation is fed to a copy
        return score_continuation(self.model, logits, cache.copy(), continuation)[0]

    @torch.inference_mode()  # the rows are inference tensors: moving one is an in-place write
    def cancel(self, seq: Decoding) -> None:
        """Take a sequence out of the batch before it finishes (its client left)."""
        if seq.finish_reason is None:
            seq.finish_reason = "cancelled"
            self._leave()

    @staticmethod
    def _take(seq: Decoding, token: int) -> None:
        if token in seq.stop_tokens:
            seq.finish_reason = "stop"
            return
        seq.tokens.append(token)
        if seq.on_token is not None:
            seq.on_token(token)
        if len(seq.tokens) >= seq.max_new_tokens:
            seq.finish_reason = "length"

    def _leave(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.finish_reason is not None]
        if not gone:
            return
        lengths = list(self.cache.lengths)
        for i in reversed(gone):  # from the end: the last row is then always one that stays
            last = len(self.rows) - 1
            if i != last:
                self.slots.put(i, self.cache, last, lengths[last])
                self.rows[i], lengths[i] = self.rows[last], lengths[last]
            self.rows.pop()
            lengths.pop()
        self.cache = self.slots.head(len(self.rows), lengths) if self.rows else None


def time_to_first_token(model, prompt: list[int], repeats: int = 3) -> float:
    """Seconds from prompt to the first sampled token's logits (batch 1, the prefill), best of repeats."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], device=device)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model.allocate_cache(1, len(prompt) + 1)
            t0 = time.perf_counter()
            model(idx, cache=cache, last_only=True)
            best = min(best, time.perf_counter() - t0)
    return best
