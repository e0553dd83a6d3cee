"""Chat rendering at token level, and the rag stage's examples: documents reach the input, only the
reply carries loss, gold documents land at every rank, and abstention is taught when they are absent."""

import hashlib
import json
import random
from collections import Counter

import pytest
import torch

from hybridchat.core.documents import Document
from hybridchat.data.chat import ChatFormat, ChatRenderer, collate, example_batches, padded_width
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.rag.answer import ABSTAIN, CHARS_PER_TOKEN, fit_prompt, fit_question, format_reply, parse_reply


@pytest.fixture(scope="module")
def tok():
    texts = ["Ada Vell was born in Vellport. Where was Ada Vell born? The documents do not say."] * 20
    return Tokenizer.train(texts, 400)


DOCS = [Document("person-0001", "Ada Vell", "Ada Vell was born in Vellport."),
        Document("city-0002", "Vellport", "Vellport is a city.")]


def test_documents_and_turns_render_in_order_with_loss_only_on_the_reply(tok):
    r = ChatRenderer(tok)
    t, enc = tok.token_id, tok.encode
    ids, mask = r.render([{"role": "user", "content": "Where was Ada Vell born?", "documents": DOCS},
                          {"role": "assistant", "content": "[1] Vellport"}])
    expected = ([t("<|bos|>"), t("<|user_start|>"), *enc("Where was Ada Vell born?"), t("<|user_end|>"),
                 t("<|documents_start|>"),
                 t("<|document_start|>"), *enc("[1] Ada Vell (person-0001)\nAda Vell was born in Vellport."),
                 t("<|document_end|>"),
                 t("<|document_start|>"), *enc("[2] Vellport (city-0002)\nVellport is a city."), t("<|document_end|>"),
                 t("<|documents_end|>"), t("<|assistant_start|>")])
    reply = [*enc("[1] Vellport"), t("<|assistant_end|>")]
    assert ids == expected + reply
    assert mask == [0] * len(expected) + [1] * len(reply)


def chatml_tokenizer() -> Tokenizer:
    """A ChatML vocabulary like an imported model's (SmolLM2): no hybridchat tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["Ada Vell was born in Vellport. user assistant Documents"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf)


def test_chatml_vocabulary_renders_the_chatml_template_with_documents_in_the_user_turn():
    tok = chatml_tokenizer()
    r = ChatRenderer(tok)
    assert tok.bos_id == tok.token_id("<|endoftext|>") and r.stop_token == tok.token_id("<|im_end|>")
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Where was Ada Vell born?", "documents": DOCS[:1]},
                    {"role": "assistant", "content": "[1] Vellport"},
                    {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome"}]
    ids, mask = r.render(conversation)
    # The reference: the ChatML template written out as one string (control tokens by id, below).
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere was Ada Vell born?\n\nDocuments:\n\n"
                "[1] Ada Vell (person-0001)\nAda Vell was born in Vellport.<|im_end|>\n"
                "<|im_start|>assistant\n[1] Vellport<|im_end|>\n"
                "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\nYou're welcome<|im_end|>\n")
    assert tok.decode(ids) == expected
    controls = {tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")}
    assert sum(i in controls for i in ids) == 10  # each a single control token, never spelled out
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "[1] Vellport<|im_end|>You're welcome<|im_end|>"
    prompt = r.prompt(conversation[:2])
    assert tok.decode(prompt).endswith("Vellport.<|im_end|>\n<|im_start|>assistant\n")


def test_collate_masks_everything_but_the_reply_and_pads_on_the_right(tok):
    r = ChatRenderer(tok)
    long = r.render([{"role": "user", "content": "Where?", "documents": DOCS}, {"role": "assistant", "content": "A"}])
    short = r.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}])
    batch = collate([long, short], pad_id=0)
    assert batch["inputs"].shape == (2, len(long[0]) - 1)
    assert batch["inputs"][0].tolist() == long[0][:-1]
    learned = batch["targets"][1][batch["targets"][1] >= 0].tolist()
    assert tok.decode(learned) == "Hello there<|assistant_end|>"
    assert (batch["targets"][1, len(short[0]) - 1:] == -1).all()  # padding carries no loss
    assert tok.decode(batch["targets"][0][batch["targets"][0] >= 0].tolist()) == "A<|assistant_end|>"


@pytest.mark.parametrize("longest, limit, width", [
    (5, None, 5), (1, 512, 1), (5, 512, 8), (8, 512, 8), (9, 512, 16), (300, 512, 512), (300, 384, 384),
    (400, 384, 400),
])
def test_padded_width_is_the_next_power_of_two_up_to_the_limit(longest, limit, width):
    assert padded_width(longest, limit) == width


def test_collate_with_a_width_limit_pads_rows_to_the_bucket_without_loss_on_padding(tok):
    r = ChatRenderer(tok)
    rows = [r.render([{"role": "user", "content": q}, {"role": "assistant", "content": "Yes"}]) for q in ("Hi", "Who?")]
    longest = max(len(ids) for ids, _ in rows) - 1
    exact, bucketed = collate(rows, pad_id=0), collate(rows, pad_id=0, width_limit=1024)
    width = 1 << (longest - 1).bit_length()
    assert width > longest and bucketed["inputs"].shape == (2, width) and exact["inputs"].shape == (2, longest)
    assert torch.equal(bucketed["inputs"][:, :longest], exact["inputs"]) and (bucketed["inputs"][:, longest:] == 0).all()
    assert torch.equal(bucketed["targets"][:, :longest], exact["targets"]) and (bucketed["targets"][:, longest:] == -1).all()


def test_special_token_text_in_messages_and_documents_stays_text(tok):
    r = ChatRenderer(tok)
    doc = Document("d", "t", "<|assistant_start|>fake")
    ids, _ = r.render([{"role": "user", "content": "<|user_end|>", "documents": [doc]},
                       {"role": "assistant", "content": "x"}])
    specials = {tok.token_id(s) for s in ("<|user_end|>", "<|assistant_start|>")}
    assert Counter(i for i in ids if i in specials) == Counter({tok.token_id("<|user_end|>"): 1,
                                                                tok.token_id("<|assistant_start|>"): 1})


def test_system_message_is_folded_into_the_first_user_turn_and_prompt_ends_at_assistant_start(tok):
    r = ChatRenderer(tok)
    prompt = r.prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt[-1] == tok.token_id("<|assistant_start|>")
    assert "Be brief.\n\nHi" in tok.decode(prompt)


def test_reply_format_round_trips():
    assert format_reply("Vellport", 2) == "[2] Vellport"
    assert parse_reply(format_reply("Vellport", 2)) == ("Vellport", [2], False)
    assert format_reply("Vellport", 2, cite_first=False) == "Vellport [2]"
    assert parse_reply(format_reply("Vellport", 2, cite_first=False)) == ("Vellport", [2], False)
    assert parse_reply(format_reply(None)) == (ABSTAIN, [], True)
    assert parse_reply("Vellport") == ("Vellport", [], False)


def test_fit_prompt_drops_the_lowest_ranked_documents_first(tok):
    r = ChatRenderer(tok)
    full, kept = fit_prompt(r, "Where?", DOCS, 10_000)
    assert kept == DOCS
    one, kept = fit_prompt(r, "Where?", DOCS, len(full) - 1)
    assert kept == DOCS[:1] and len(one) < len(full)
    _, kept = fit_prompt(r, "Where?", DOCS, 5)
    assert kept == []


def longest_fitting_prefix(r, question, max_tokens):
    """By hand: the longest prefix whose prompt (with an empty documents section) fits, every length
    tried (a longer prefix can take fewer tokens: " bor" is two, " born" one)."""
    return max((question[:k] for k in range(len(question) + 1)
                if len(r.prompt([{"role": "user", "content": question[:k], "documents": []}])) <= max_tokens), key=len)


def test_a_question_longer_than_the_context_is_cut_without_being_tokenized_whole(tok, monkeypatch):
    """A 5 MB question ran the model over a million tokens (evaluate: 10 minutes, 12.8 GB; chat: out
    of memory); fit_prompt dropped the documents but never cut the question."""
    r = ChatRenderer(tok)
    question = "Where was Ada Vell born? " * 200_000
    lengths, encode = [], tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: lengths.append(len(text)) or encode(text))
    cut = fit_question(r, question, 40)
    assert max(lengths) <= 40 * CHARS_PER_TOKEN  # the question was never tokenized whole
    monkeypatch.undo()
    reference = longest_fitting_prefix(r, question[:400], 40)
    assert question.startswith(cut) and len(reference) - 12 <= len(cut) <= len(reference)
    ids, kept = fit_prompt(r, question, DOCS, 40)
    assert kept == [] and ids == r.prompt([{"role": "user", "content": cut, "documents": []}]) and len(ids) <= 40
    assert fit_question(r, "Where?", 40) == "Where?"  # a question that fits is left alone


def test_a_question_cut_inside_a_character_still_fits(tok):
    r = ChatRenderer(tok)
    assert len(tok.encode("é")) == 2 and len(tok.encode(tok.decode(tok.encode("é")[:1]))) > 1
    overhead = len(r.prompt([{"role": "user", "content": "", "documents": []}]))
    for room in (7, 8):  # 7: the seventh token is half an "é", whose replacement character takes more room
        cut = fit_question(r, "é" * 1000, overhead + room)
        assert cut == "é" * (room // 2)


def test_example_batches_cover_each_item_once_per_epoch_and_resume_and_shard_exactly():
    seen = []

    def make(i, epoch):
        seen.append((i, epoch))
        return [i, i, i], [0, 1, 1]

    batches = example_batches(10, make, 3, seed=1, pad_id=0)
    first_epoch = [next(batches) for _ in range(3)]
    items = [row[0] for b in first_epoch for row in b["inputs"].tolist()]
    assert sorted(items) == sorted(set(items)) and len(items) == 9  # 3 full batches, no repeats
    again = list(example_batches(10, make, 3, seed=1, pad_id=0, start=1).__next__()["inputs"].tolist())
    assert again == first_epoch[1]["inputs"].tolist()
    rank1 = example_batches(10, make, 3, seed=1, pad_id=0, rank=1, world_size=2)
    assert torch.equal(next(rank1)["inputs"], first_epoch[1]["inputs"])


def test_length_grouping_cuts_each_pool_of_batches_by_length_and_keeps_the_epoch_and_resume():
    lengths = random.Random(0).choices(range(2, 80), k=64)

    def make(i, epoch):
        return [i] * lengths[i], [1] * lengths[i]

    def first(it, n):
        return [[row[0] for row in next(it)["inputs"].tolist()] for _ in range(n)]

    plain = first(example_batches(64, make, 4, seed=1, pad_id=0), 16)
    grouped = first(example_batches(64, make, 4, seed=1, pad_id=0, length_grouping=8), 16)
    for pool in (slice(0, 8), slice(8, 16)):  # the same items per pool of 8 batches as without grouping
        mine = sorted(i for b in grouped[pool] for i in b)
        assert mine == sorted(i for b in plain[pool] for i in b)
        ranked = sorted(lengths[i] for i in mine)  # hand reference: consecutive runs of 4 in length order
        runs = sorted(ranked[k:k + 4] for k in range(0, 32, 4))
        assert sorted(sorted(lengths[i] for i in b) for b in grouped[pool]) == runs
    assert grouped[:8] != sorted(grouped[:8], key=lambda b: max(lengths[i] for i in b))  # not shortest first

    def padded(batches):
        return sum(4 * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.8 * padded(plain)
    again = first(example_batches(64, make, 4, seed=1, pad_id=0, start=11, length_grouping=8), 1)
    assert again == grouped[11:12]  # resuming mid-pool
    rank1 = first(example_batches(64, make, 4, seed=1, pad_id=0, rank=1, world_size=2, length_grouping=8), 2)
    assert rank1 == [grouped[1], grouped[3]]


class _Ctx:  # the pieces RagStage.documents_and_reply reads
    class config:
        class stage:
            min_documents, max_documents, candidates, gold_missing, cite_first, gold_position = 1, 4, 10, 0.2, True, "uniform"


def _rag_stage():
    from hybridchat.training.stages.rag import RagStage

    stage = RagStage.__new__(RagStage)
    stage.config = _Ctx.config.stage
    return stage


def test_rag_examples_put_the_gold_document_at_every_rank_and_teach_abstention_without_it():
    from hybridchat.core.questions import Question

    docs = tuple(Document(f"d{i}", f"T{i}", f"text {i}") for i in range(10))
    q = Question("Where?", ("Vellport",), ("d5",), docs)
    stage, rng = _rag_stage(), random.Random(0)
    positions, abstain = Counter(), 0
    for _ in range(2000):
        shown, reply = stage.documents_and_reply(q, rng)
        assert 1 <= len(shown) <= 4
        answer, cited, abstained = parse_reply(reply)
        if abstained:
            abstain += 1
            assert all(d.id != "d5" for d in shown)
        else:
            assert answer == "Vellport" and shown[cited[0] - 1].id == "d5"
            assert [d.id for d in shown if d.id != "d5"] == [f"d{i}" for i in range(10) if i != 5][:len(shown) - 1]
            positions[cited[0]] += 1
    assert set(positions) == {1, 2, 3, 4}
    assert 0.15 < abstain / 2000 < 0.25  # stage.gold_missing = 0.2
    missed = Question("Where?", ("Vellport",), ("elsewhere",), docs)
    assert all(parse_reply(stage.documents_and_reply(missed, rng)[1])[2] for _ in range(50))
    unanswerable = Question("Where?", (), (), docs)
    assert all(parse_reply(stage.documents_and_reply(unanswerable, rng)[1])[2] for _ in range(50))


# ---------------------------------------------------------------------------------------------
# Past one hop and one turn; the format's parts; the batch order's derivation (mutation testing)


def _documents(*names):
    return [Document(f"d-{n}", n, f"{n} text.") for n in names]


def test_retrieved_documents_number_on_across_hops_and_turns_and_a_new_section_starts_again(tok):
    """Citations count every document shown since the latest user section: hop documents number on from
    it and from the hops before, in this reply and the next (a turn without documents keeps them);
    a user turn with documents starts again at 1."""
    r = ChatRenderer(tok)
    conversation = [
        {"role": "user", "content": "Q1", "documents": _documents("A", "B")},
        {"role": "assistant", "content": "[4] x", "hops": [{"query": "k1", "documents": _documents("C")},
                                                          {"query": "k2", "documents": _documents("D", "E")}]},
        {"role": "user", "content": "Q2"},  # no documents: the numbering goes on
        {"role": "assistant", "content": "[6] y", "hops": [{"query": "k3", "documents": _documents("F")},
                                                          {"query": "k4", "documents": []}]},
        {"role": "user", "content": "Q3", "documents": _documents("G")},
        {"role": "assistant", "content": "[2] z", "hops": [{"query": "k5", "documents": _documents("H")}]},
    ]
    text = tok.decode(r.render(conversation)[0])
    numbered = [line.split("<|document_start|>")[-1] for line in text.split("\n") if "(d-" in line]
    assert numbered == ["[1] A (d-A)", "[2] B (d-B)", "[3] C (d-C)", "[4] D (d-D)", "[5] E (d-E)", "[6] F (d-F)",
                        "[1] G (d-G)", "[2] H (d-H)"]
    # An empty result is a closed, empty section, given like any other.
    assert "<|query_start|>k4<|query_end|><|documents_start|><|documents_end|>[6] y<|assistant_end|>" in text


def test_hop_documents_after_a_question_without_documents_number_from_1(tok):
    """Closed-book hop 1 (no documents section at all): the first retrieved document is [1]."""
    r = ChatRenderer(tok)
    text = tok.decode(r.render([{"role": "user", "content": "Q"},
                                {"role": "assistant", "content": "[1] x",
                                 "hops": [{"query": "k", "documents": _documents("A", "B")}]}])[0])
    assert "<|documents_start|><|document_start|>[1] A (d-A)" in text and "[2] B (d-B)" in text


def test_a_query_whose_opening_is_not_taught_still_teaches_its_words(tok):
    r = ChatRenderer(tok)
    t = tok.token_id
    ids, mask = r.render([{"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A", "hops": [
                              {"query": "k", "documents": [], "learn_opening": False},
                              {"query": "m", "documents": []}]}])
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == [*tok.encode("k"), t("<|query_end|>"), t("<|query_start|>"), *tok.encode("m"),
                       t("<|query_end|>"), *tok.encode("A"), t("<|assistant_end|>")]


def test_a_system_message_is_rendered_once_before_the_first_user_turn_only(tok):
    r = ChatRenderer(tok)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    ids, mask = r.render(conversation)
    t = tok.token_id
    assert ids == [t("<|bos|>"), t("<|user_start|>"), *tok.encode("Be brief.\n\nHi"), t("<|user_end|>"),
                   t("<|assistant_start|>"), *tok.encode("Hello"), t("<|assistant_end|>"),
                   t("<|user_start|>"), *tok.encode("Bye"), t("<|user_end|>")]
    assert sum(mask) == len(tok.encode("Hello")) + 1
    # Of two system messages before a user turn, the later one is folded in.
    later = r.render([{"role": "system", "content": "Old."}, {"role": "system", "content": "New."},
                      {"role": "user", "content": "Hi"}])[0]
    assert tok.decode(later) == "<|bos|><|user_start|>New.\n\nHi<|user_end|>"
    chatml = chatml_tokenizer()
    text = chatml.decode(ChatRenderer(chatml).render(conversation)[0])
    assert text.count("Be brief.") == 1 and text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<|im_start|>user\nBye<|im_end|>\n" in text


def test_a_prompt_ends_with_a_user_or_system_message(tok):
    r = ChatRenderer(tok)
    for messages in ([], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]):
        with pytest.raises(ValueError, match="^a prompt ends with a user message$"):
            r.prompt(messages)
    assert tok.decode(r.prompt([{"role": "system", "content": "S"}])) == "<|bos|><|assistant_start|>"


def test_our_format_by_token_name_and_a_vocabulary_of_neither_format_is_refused(tok):
    r = ChatRenderer(tok)
    f = r.format
    names = {name: tok.token_id(name) for name in tok.special_tokens}
    assert f.begin == (names["<|bos|>"],) and f.after_assistant == () and f.system is None
    assert f.user == ((names["<|user_start|>"],), (names["<|user_end|>"],))
    assert f.assistant == ((names["<|assistant_start|>"],), (names["<|assistant_end|>"],))
    assert f.documents == f.results == ((names["<|documents_start|>"],), (names["<|documents_end|>"],))
    assert f.document == ((names["<|document_start|>"],), (names["<|document_end|>"],))
    assert f.query == ((names["<|query_start|>"],), (names["<|query_end|>"],)) and not f.documents_in_user_turn
    assert f.request_markers == ((names["<|user_start|>"], names["<|query_start|>"]),
                                 (names["<|user_end|>"], names["<|query_end|>"]))
    assert r.stop_token == f.stop_token == names["<|assistant_end|>"] and r.pad_id == tok.bos_id
    assert r.query_markers == ("<|query_start|>", "<|query_end|>")
    assert r.results([], 3) == [names["<|documents_start|>"], names["<|documents_end|>"]]
    assert r.documents_section(DOCS[1:], first=4) == [
        names["<|documents_start|>"], names["<|document_start|>"], *tok.encode("[4] Vellport (city-0002)\nVellport is a city."),
        names["<|document_end|>"], names["<|documents_end|>"]]
    assert ChatFormat.ours() == f  # a tokenizer trained here has the reserved ids first, in order
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    plain = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a"))
    plain.add_special_tokens(["<|endoftext|>"])
    with pytest.raises(ValueError, match=r"^the tokenizer has neither hybridchat's chat tokens \(<\|user_start\|>\) "
                                         r"nor ChatML's \(<\|im_start\|>\)$"):
        ChatRenderer(Tokenizer(plain))


def test_too_few_examples_for_one_batch_is_an_error_and_grouping_below_one_is_none():
    def make(i, epoch):
        return [i, i], [1, 1]

    with pytest.raises(ValueError, match="^3 examples do not fill one batch of 4$"):
        next(example_batches(3, make, 4, seed=0, pad_id=0))
    plain = [next(b)["inputs"].tolist() for b in [example_batches(12, make, 4, seed=2, pad_id=0)] for _ in range(3)]
    for grouping in (0, -1):
        grouped = example_batches(12, make, 4, seed=2, pad_id=0, length_grouping=grouping)
        assert [next(grouped)["inputs"].tolist() for _ in range(3)] == plain


def test_the_batch_order_is_the_documented_derivation_from_seed_and_epoch():
    """Pinned by hand, as a resumed run depends on it: a checkpoint's data position means the same
    batches to the next version. Epoch e's order is random.Random(s).shuffle, s the data-order stream's
    seed at ("epoch", e): the first 8 bytes of SHA-256 of the JSON [seed, "data_order", "epoch", e],
    big-endian, shifted right by one (core/seeds.py); with length grouping, each pool's batches are
    shuffled by the stream's generator at ("pool", epoch, first batch)."""
    def stream(*keys):
        digest = hashlib.sha256(json.dumps(list(keys)).encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big") >> 1)

    def make(i, epoch):
        return [i] * (2 + i % 5), [1] * (2 + i % 5)

    def rows(it, n):
        return [[row[0] for row in next(it)["inputs"].tolist()] for _ in range(n)]

    got = rows(example_batches(9, make, 3, seed=4, pad_id=0), 6)
    want = []
    for epoch in (0, 1):
        order = list(range(9))
        stream(4, "data_order", "epoch", epoch).shuffle(order)
        want += [order[k:k + 3] for k in (0, 3, 6)]
    assert got == want
    grouped = rows(example_batches(12, make, 2, seed=3, pad_id=0, length_grouping=3), 6)
    order = list(range(12))
    stream(3, "data_order", "epoch", 0).shuffle(order)
    want = []
    for first in (0, 3):
        pool = order[first * 2:(first + 3) * 2]
        by_length = sorted(pool, key=lambda i: 2 + i % 5)
        batches = [by_length[k:k + 2] for k in (0, 2, 4)]
        stream(3, "data_order", "pool", 0, first).shuffle(batches)
        want += batches
    assert grouped == want


def test_each_item_is_made_for_its_epoch_and_a_run_resumed_in_a_later_epoch_sees_the_same_batches():
    made = []

    def make(i, epoch):
        made.append((i, epoch))
        return [i] * (2 + i % 3), [0, 1] + [1] * (i % 3)

    straight = example_batches(6, make, 2, seed=5, pad_id=0, width_limit=16)
    batches = [next(straight) for _ in range(7)]  # 3 per epoch: into the third epoch
    assert [e for _, e in made] == [0] * 6 + [1] * 6 + [2] * 2
    assert sorted(i for i, _ in made[:6]) == list(range(6)) == sorted(i for i, _ in made[6:12])
    # Resumed at the first batch of epoch 1: that epoch's own order, not the items in index order.
    resumed = example_batches(6, make, 2, seed=5, pad_id=0, start=3, width_limit=16)
    for want in batches[3:7]:
        got = next(resumed)
        assert torch.equal(got["inputs"], want["inputs"]) and torch.equal(got["targets"], want["targets"])
    # width_limit reaches the batches: rows of 1-3 inputs padded to 4 (the next power of two), never past 16.
    assert {b["inputs"].shape[1] for b in batches} <= {1, 2, 4} and any(b["inputs"].shape[1] == 4 for b in batches)


def test_tokens_given_not_learned_are_targets_of_minus_one_the_loss_ignores():
    ids, mask = [5, 6, 7, 8, 9], [0, 1, 0, 1, 1]
    batch = collate([(ids, mask), ([3, 4], [0, 0])], pad_id=2)
    assert batch["inputs"].tolist() == [[5, 6, 7, 8], [3, 2, 2, 2]]
    assert batch["targets"].tolist() == [[6, -1, 8, 9], [-1, -1, -1, -1]]
    assert batch["inputs"].dtype == batch["targets"].dtype == torch.long
