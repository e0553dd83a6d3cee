"""Continuous batching (model/engine.py's DecodeBatch over a ragged cache, model/cache.py): sequences
that join a running decode at different steps, with prompts of different lengths, get exactly the
tokens each gets alone from a plain full forward without any cache, for the hybrid body, a pure
attention body and one with the position-dependent pointer and request match."""

import pytest
import torch
from conftest import TINY_VOCAB, naive_greedy, random_model, tiny_lm

from hybridchat.data.tokenizer import SPECIAL_TOKENS
from hybridchat.model.attention import rotary_at, rotary_cos_sin
from hybridchat.model.engine import DecodeBatch, sample

USER_START, USER_END = SPECIAL_TOKENS.index("<|user_start|>"), SPECIAL_TOKENS.index("<|user_end|>")
# (prompt length, step it arrives at, max_new_tokens): two start together, one arrives longer than
# every running row (the cache grows), one of a single token, one after the others have all left.
ARRIVALS = [(11, 0, 9), (3, 0, 12), (17, 2, 8), (6, 3, 10), (1, 5, 7), (8, 30, 5)]


def bodies():
    return {
        "hybrid": tiny_lm("MA"),
        "attention": tiny_lm("AA"),
        # The pointer and the request match keep per-position caches of their own (model/pointer.py,
        # model/request_match.py); prompts below hold a request for the match to mark.
        "pointer+match": random_model("MAMA", 4, TINY_VOCAB, torch.float64, 0, 0.3, pointer=True, request_match=True,
                                      chunk_size=4, sequence_len=64),
    }


def prompts(n_tokens: list[int], seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in n_tokens:
        p = torch.randint(len(SPECIAL_TOKENS), TINY_VOCAB, (n,), generator=gen).tolist()
        if n >= 6:  # a request of two tokens, then one of them again: marked where the feature is on
            p[1:5] = [USER_START, p[2], p[3], USER_END]
            p[-1] = p[2]
        out.append(p)
    return out


def run(batch: DecodeBatch, arrivals, asked, **add) -> tuple[dict, list[int]]:
    """Step the batch, adding each prompt at its step; (the sequences by index, rows per step)."""
    seqs, sizes, step = {}, [], 0
    while len(seqs) < len(arrivals) or len(batch):
        for i, (_, at, n) in enumerate(arrivals):
            if at == step:
                seqs[i] = batch.add(asked[i], n, **add.get(i, {}))
        sizes.append(len(batch))
        batch.step()
        step += 1
    return seqs, sizes


@pytest.mark.parametrize("body", ["hybrid", "attention", "pointer+match"])
def test_sequences_joining_at_different_steps_get_the_tokens_each_gets_alone(body):
    model = bodies()[body]
    asked = prompts([n for n, _, _ in ARRIVALS])
    expected = [naive_greedy(model, p, n) for p, (_, _, n) in zip(asked, ARRIVALS)]
    seqs, sizes = run(DecodeBatch(model, prefill_chunk=4), ARRIVALS, asked)
    assert [seqs[i].tokens for i in range(len(ARRIVALS))] == expected
    assert all(s.finish_reason == "length" for s in seqs.values())
    assert max(sizes) == 5 and 0 in sizes  # all five decoded together, and empty before the last one arrived


def test_a_stop_token_and_a_cancelled_row_leave_and_the_others_go_on_unchanged():
    model = tiny_lm("MA")
    asked = prompts([9, 4, 13])
    plain = [naive_greedy(model, p, 10) for p in asked]
    stop = plain[1][3]
    streamed: list[int] = []
    batch = DecodeBatch(model)
    a = batch.add(asked[0], 10)
    b = batch.add(asked[1], 10, stop_tokens=[stop], on_token=streamed.append)
    c = batch.add(asked[2], 10)
    finished = []
    for step in range(12):
        if step == 2:
            batch.cancel(a)
        finished += batch.step()
    assert a.finish_reason == "cancelled" and a.tokens == plain[0][:3] and a not in finished
    assert b.finish_reason == "stop" and b.tokens == streamed == plain[1][:plain[1].index(stop)]
    assert c.finish_reason == "length" and c.tokens == plain[2] and finished == [b, c] and len(batch) == 0


def test_suppressed_tokens_are_never_the_first_token_and_the_rest_is_greedy():
    model = tiny_lm("MA")
    asked = prompts([7, 12])
    first = naive_greedy(model, asked[0], 1)[0]
    batch = DecodeBatch(model)
    other = batch.add(asked[1], 6)
    seq = batch.add(asked[0], 6, begin_suppress_tokens=[first])
    while len(batch):
        batch.step()
    with torch.no_grad():
        logits = model(torch.tensor([asked[0]]))[0, -1]
    logits[first] = -float("inf")
    start = int(logits.argmax())
    assert seq.tokens == [start] + naive_greedy(model, asked[0] + [start], 5)
    assert other.tokens == naive_greedy(model, asked[1], 6)


def test_a_closing_token_is_sampled_only_after_its_opening_row_by_row():
    """paired_tokens is each sequence's: a row given a pair never samples its closing token before an
    opening one; a row without one decodes as plain greedy; the first token and later ones alike."""
    model = tiny_lm("MA")
    asked = prompts([7, 12, 9])
    plain = [naive_greedy(model, p, 8) for p in asked]
    unused = next(t for t in range(TINY_VOCAB) if all(t not in row for row in plain))
    k = next(k for k in range(2, 8) if plain[1][k] not in plain[1][:k])  # a later token of row 1, new there
    first, later = (unused, plain[0][0]), (unused, plain[1][k])  # closing: row 0's first token, row 1's k-th
    batch = DecodeBatch(model)
    seqs = [batch.add(asked[0], 8, paired_tokens=first), batch.add(asked[1], 8, paired_tokens=later),
            batch.add(asked[2], 8, paired_tokens=None)]
    while len(batch):
        batch.step()
    expected = [naive_greedy(model, asked[0], 8, pair=first), naive_greedy(model, asked[1], 8, pair=later), plain[2]]
    assert expected[0] != plain[0] and expected[1] != plain[1] and expected[1][:k] == plain[1][:k]
    assert [s.tokens for s in seqs] == expected


@pytest.mark.parametrize("body", ["hybrid", "attention", "pointer+match"])
def test_a_ragged_forward_of_several_tokens_equals_each_rows_full_forward(body):
    """Rows prefilled alone (6, 9 and 2 tokens; the first two hold a request), put in the rows of one
    cache, then 3 more tokens each in one forward through a view of them: each
    row's logits are its own full forward's, and the cache keeps each row's own length. (Logits, not
    greedy tokens: a slip that moves no argmax in a few steps shows here.)"""
    model = bodies()[body]
    asked = prompts([6, 9, 2])
    more = torch.randint(0, TINY_VOCAB, (3, 3), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        caches = []
        for p in asked:
            caches.append(model.allocate_cache(1, 16))
            model(torch.tensor([p]), cache=caches[-1])
        slots = model.allocate_cache(3, 14)
        for row, c in enumerate(caches):
            slots.put(row, c)
        cache = slots.head(3, [6, 9, 2])
        assert cache.lengths == [6, 9, 2] and cache.pos == 9 and cache.max_len == 14 and cache.batch_size == 3
        got = model(more, cache=cache)
        assert cache.lengths == [9, 12, 5] and cache.pos == 12
        for row, p in enumerate(asked):
            want = model(torch.cat([torch.tensor([p]), more[row:row + 1]], 1))[0, -3:]
            torch.testing.assert_close(got[row], want, rtol=1e-10, atol=1e-10)
        picked = cache.select([2, 0])
        assert picked.lengths == [5, 9] and picked.pos == 9
        with pytest.raises(ValueError, match="a row holds 12 tokens, more than max_len=10"):
            model.allocate_cache(1, 10).put(0, cache, 1)


def test_per_row_rotary_tables_equal_the_shared_ones_to_the_bit():
    positions = torch.tensor([[0, 1, 2], [7, 8, 9], [300, 301, 302]])
    cos, sin = rotary_at(positions, 16, 10000.0)
    for row, start in enumerate((0, 7, 300)):
        shared = rotary_cos_sin(3, 16, 10000.0, offset=start)
        assert torch.equal(cos[row:row + 1], shared[0]) and torch.equal(sin[row:row + 1], shared[1])


def test_a_prompt_or_length_that_cannot_decode_is_refused():
    batch = DecodeBatch(tiny_lm("MA"))
    with pytest.raises(ValueError, match="at least one prompt token"):
        batch.add([], 3)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        batch.add([1, 2], 0)
    assert len(batch) == 0 and batch.step() == []


def test_a_continuation_is_scored_from_the_prefill_and_admit_can_refuse_the_sequence():
    """seq.score is the teacher-forced log-probability a full forward over prompt + continuation
    gives; admit(score) False refuses the sequence before it samples or joins."""
    model = random_model("MAMA", 4, TINY_VOCAB, torch.float64, 0, 0.3, pointer=True, request_match=True,
                         chunk_size=4, sequence_len=64)
    asked, continuation = prompts([9])[0], [5, 17, 3, 30]
    with torch.no_grad():
        logp = model(torch.tensor([asked + continuation]))[0].log_softmax(-1)
    want = sum(logp[len(asked) - 1 + i, t].item() for i, t in enumerate(continuation))
    batch = DecodeBatch(model)
    scores = []
    kept = batch.add(asked, 2, score=continuation, admit=lambda s: scores.append(s) is None)
    refused = batch.add(asked, 2, score=continuation[:1], admit=lambda s: False)
    assert kept.score == pytest.approx(want, abs=1e-10) and scores == [kept.score] and len(batch) == 1
    assert refused.finish_reason == "refused" and refused.tokens == [] and refused.score == pytest.approx(
        logp[len(asked) - 1, continuation[0]].item(), abs=1e-10)
    batch.step()
    assert kept.tokens == naive_greedy(model, asked, 2) and len(batch) == 0


def test_joins_and_leaves_reuse_the_preallocated_rows_without_reallocating():
    """Within its rows and length, a batch keeps one allocation: a join copies its row in, a leave
    moves the last row into the freed one (the other rows stay where they are), and every sequence
    still gets exactly its own greedy tokens."""
    model = tiny_lm("MA")
    asked = prompts([9, 4, 13, 6, 5])
    batch = DecodeBatch(model, rows=4)
    a, b, c = (batch.add(p, 10) for p in asked[:3])
    slots = batch.slots
    assert slots.batch_size == 4 and len(batch) == 3
    for _ in range(2):
        batch.step()
    batch.cancel(a)  # c moves into a's row
    assert batch.rows == [c, b] and batch.cache.lengths == [13 + 2, 4 + 2]
    d, e = batch.add(asked[3], 10), batch.add(asked[4], 10)
    while len(batch):
        batch.step()
    assert batch.slots is slots
    for seq, p in zip((b, c, d, e), asked[1:]):
        assert seq.tokens == naive_greedy(model, p, 10)



@pytest.mark.parametrize("body", ["hybrid", "attention", "pointer+match"])
def test_tokens_fed_to_one_row_mid_decode_are_read_by_that_row_alone(body):
    """feed appends tokens to one sequence (a multi-hop reply's retrieved documents) while the others
    decode: each then gets exactly the tokens a full forward over everything it holds gives, seq.score
    is read after the tokens fed, and a row fed past the rows' length grows them."""
    model = bodies()[body]
    asked = prompts([9, 4, 13])
    fed = {1: (2, prompts([5], seed=7)[0]), 0: (3, prompts([60], seed=8)[0])}  # row: (tokens sampled before, tokens)
    continuation = [5, 17, 3]

    def inject(row):
        at, tokens = fed.get(row, (None, None))
        return lambda out: tokens if len(out) == at else None

    expected = [naive_greedy(model, p, 8, inject(i)) for i, p in enumerate(asked)]
    batch = DecodeBatch(model, prefill_chunk=4)
    outs = [[] for _ in asked]
    seqs = [batch.add(p, 8, on_token=out.append) for p, out in zip(asked, outs)]
    rows_length = batch.slots.max_len
    while len(batch):
        for i, (at, tokens) in fed.items():
            if len(outs[i]) == at and seqs[i].fed == 0:
                batch.feed(seqs[i], tokens, score=continuation)
                outs[i][at:at] = tokens  # the token it sampled after them is already in
        batch.step()
    assert outs == expected and [len(s.tokens) for s in seqs] == [8, 8, 8] and seqs[1].fed == 5
    assert batch.slots.max_len > rows_length  # row 0's 60 tokens did not fit the rows allocated for the prompts
    before = asked[1] + expected[1][:2 + 5]
    with torch.no_grad():
        logp = model(torch.tensor([before + continuation]))[0].log_softmax(-1)
    want = sum(logp[len(before) - 1 + j, t].item() for j, t in enumerate(continuation))
    assert seqs[1].score == pytest.approx(want, abs=1e-5)


def test_rows_grow_by_doubling_and_length_by_64_only_when_a_sequence_needs_it():
    """The preallocated rows by hand, from rows=1: a second sequence doubles them to 2, a third to 4 (not 3);
    a sequence that fills a row of 64 exactly (54 + 10) joins without a new allocation; one of 65 positions
    (55 + 10) while a row is free keeps the 4 rows and rounds the length up to 128. Every sequence gets its
    own greedy tokens. Only the last position of each prefill forward reaches the head."""
    model = tiny_lm("MA")
    asked = prompts([9, 54, 4, 54, 55])
    head = []
    model.norm_f.register_forward_pre_hook(lambda mod, args: head.append(args[0].shape[1]))
    assert DecodeBatch(model).prefill_chunk == 512  # the default, as Engine's
    batch = DecodeBatch(model, prefill_chunk=32)
    a = batch.add(asked[0], 10)
    assert (batch.slots.batch_size, batch.slots.max_len) == (1, 64)
    assert head == [1]  # one forward of 9 tokens, its last position through the head
    b = batch.add(asked[1], 10)
    assert (batch.slots.batch_size, batch.slots.max_len) == (2, 64)
    assert head == [1, 1, 1]  # 54 tokens in chunks of 32: 32 + 22
    c = batch.add(asked[2], 10)
    slots = batch.slots
    assert (slots.batch_size, slots.max_len) == (4, 64)
    d = batch.add(asked[3], 10)  # 64 positions in a row of 64, a row free: the same allocation
    assert batch.slots is slots and len(batch) == 4
    batch.cancel(a)
    e = batch.add(asked[4], 10)  # 65 positions: longer rows, as many
    assert (batch.slots.batch_size, batch.slots.max_len) == (4, 128)
    while len(batch):
        batch.step()
    for seq, p in zip((b, c, d, e), asked[1:]):
        assert seq.tokens == naive_greedy(model, p, 10)


def test_a_batch_does_not_depend_on_torchs_default_device():
    """Under `with torch.device("meta")` every tensor made without an explicit device is a meta tensor:
    prefills, steps, a feed and the scores must use the model's device (CPU here) and give the plain
    greedy tokens and a full forward's scores."""
    model = tiny_lm("MA")
    asked = prompts([7, 4])
    fed = prompts([5], seed=7)[0]
    continuation = [5, 17]
    expected = [naive_greedy(model, asked[0], 4, inject=lambda out: fed if len(out) == 1 else None),
                naive_greedy(model, asked[1], 4)]
    with torch.device("meta"):
        batch = DecodeBatch(model, prefill_chunk=4)
        a = batch.add(asked[0], 4, score=continuation)
        b = batch.add(asked[1], 4)
        batch.feed(a, fed)
        while len(batch):
            batch.step()
    assert [a.tokens[:1] + fed + a.tokens[1:], b.tokens] == expected
    with torch.no_grad():
        logp = model(torch.tensor([asked[0] + continuation]))[0].log_softmax(-1)
    want = logp[len(asked[0]) - 1, continuation[0]] + logp[len(asked[0]), continuation[1]]
    assert a.score == pytest.approx(want.item(), abs=1e-10)


def test_two_rows_leaving_at_one_step_keep_the_last_rows_whole_state():
    """Rows a b c d; b and c finish at the same step (3 tokens each), so d, the last row, moves into b's
    row after c's row was filled from it: d's 15 positions (13 + 2 fed) are copied, not c's 6; a and d
    go on as a plain greedy loop (attention only: every cached key counts). And under CPU bf16 autocast
    the rows are allocated in bf16."""
    model = tiny_lm("AA")
    asked = prompts([5, 6, 4, 13])
    batch = DecodeBatch(model)
    seqs = [batch.add(p, n) for p, n in zip(asked, (8, 3, 3, 8))]
    finished = [batch.step() for _ in range(2)]
    assert finished == [[], seqs[1:3]] and batch.rows == [seqs[0], seqs[3]]
    while len(batch):
        batch.step()
    assert [s.tokens for s in seqs] == [naive_greedy(model, p, n) for p, n in zip(asked, (8, 3, 3, 8))]
    model = model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = DecodeBatch(model)
        batch.add(asked[0], 4)
    assert batch.slots.nbytes() == model.allocate_cache(1, 64, dtype=torch.bfloat16).nbytes()


def naive_sampling(model, prompt, n, seed, **options):
    """A plain loop: a full forward per token, engine.sample on its last logits with a generator seeded
    `seed`, one draw per token, as a one-row batch draws."""
    generator, seq, out = torch.Generator().manual_seed(seed), list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out.append(sample(model(torch.tensor([seq]))[:, -1], generator=generator, **options).item())
            seq.append(out[-1])
    return out


@pytest.mark.parametrize("options", [dict(temperature=1.5, top_k=3), dict(temperature=1.5, top_p=0.5),
                                     dict(temperature=0.7)])
def test_a_seeded_batch_samples_with_its_options_as_a_plain_loop_does(options):
    """temperature, top_k and top_p reach every draw, from the batch's own generator seeded `seed`: one
    sequence gets the tokens of a plain full-forward loop drawing from a generator of that seed."""
    model = tiny_lm("MA")
    asked = prompts([7])[0]
    batch = DecodeBatch(model, seed=11, **options)
    seq = batch.add(asked, 12)
    while len(batch):
        batch.step()
    assert seq.tokens == naive_sampling(model, asked, 12, 11, **options)
    assert naive_sampling(model, asked, 12, 11, **options) != naive_sampling(model, asked, 12, 12, **options)
