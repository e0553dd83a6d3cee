"""rag/answer.py on its own: reading a reply (citations anywhere, an abstention that cites), whether a
cited document states the answer (whole words after normalisation), the per-question scores by hand,
the Answerer's batches, threshold and context budget with a scripted tiny model, and P(ABSTAIN)
against a plain per-prompt loop. (The prompt fitting is in tests/test_chat.py; a trained model's
answers in tests/test_rag.py.)"""

import math
from dataclasses import replace

import pytest
import torch
from test_refrag import Scripted, chain, tiny_lm

from hybridchat.core.documents import Document
from hybridchat.data.chat import ChatRenderer
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.model.engine import DecodeBatch, GenerationResult
from hybridchat.rag import answer as answer_module
from hybridchat.rag.answer import (
    ABSTAIN,
    Answer,
    Answerer,
    RankOrderReader,
    fit_prompt,
    fit_question,
    format_reply,
    holds,
    parse_reply,
    score,
)
from hybridchat.rag.coverage import Coverage
from hybridchat.rag.multihop import Hop

ADA = Document("person-1", "Ada Vell", "Ada Vell was born in Vellport, on the coast.")
KOR = Document("company-2", "Kor Industries", "Kor Industries was founded by Tam Brel.")
PORT = Document("city-3", "Vellportia", "Vellportia is a port town.")
CHUNK = Document("person-1#2", "Ada Vell", "She moved to Kor.", metadata={"parent_id": "person-1"})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [f"{d.title} {d.text}" for d in (ADA, KOR, PORT)] + [ABSTAIN, "Where was Ada Vell born? [1] [2] [3]"]
    return Tokenizer.train(texts * 20, 400)


# ---------------------------------------------------------------------------------------------
# The reply format


def test_a_reply_without_a_citation_is_the_answer_alone_and_none_is_the_abstention():
    assert format_reply("Vellport") == "Vellport"
    assert format_reply("Vellport", None, cite_first=False) == "Vellport"
    assert format_reply(None, 3) == ABSTAIN == "The documents do not say."
    assert format_reply("Vellport", 0) == "[0] Vellport"  # 0 is a number, not "no citation"


def test_citations_anywhere_are_read_in_order_and_cut_out_of_the_answer():
    assert parse_reply("[1] Vell  port [3]") == ("Vell port", [1, 3], False)
    assert parse_reply("[12]Vellport[2]") == ("Vellport", [12, 2], False)
    assert parse_reply("  Vellport\n") == ("Vellport", [], False)
    assert parse_reply("") == ("", [], False)
    assert parse_reply("[x] Vellport") == ("[x] Vellport", [], False)  # only numbers are citations


def test_an_abstention_that_cites_a_document_is_still_an_abstention():
    """A reply may hold both: the citation is read (a reward can see it) but the reply abstains, and it
    scores as an abstention, not as a wrong answer."""
    answer, citations, abstained = parse_reply(f"[2] {ABSTAIN}")
    assert (answer, citations, abstained) == (ABSTAIN, [2], True)
    reply = Answer("q", f"[2] {ABSTAIN}", answer, citations, abstained, 0.5, [ADA, KOR])
    scores = score(reply, ["Vellport"], ["person-1"])
    assert scores["abstain"] == scores["false_abstention"] == 1.0
    assert scores["hallucination"] == 0.0 and scores["em"] == scores["f1"] == 0.0 and scores["citation"] is None
    assert score(reply, [])["hallucination"] == 0.0  # unanswerable: the right call
    # Its F1 is 0 even against an answer that shares its words ("say").
    assert score(reply, ["They say so"])["f1"] == 0.0 and score(_reply("[1] say so"), ["They say so"])["f1"] > 0
    assert parse_reply(f"{ABSTAIN} Vellport")[2] is False  # more than the abstention is an answer


# ---------------------------------------------------------------------------------------------
# Whether a document states the answer


@pytest.mark.parametrize("answer, stated", [
    ("Vellport", True),
    ("vellport!", True),          # normalised: case and punctuation
    ("born in Vellport", True),   # several words, in order
    ("Ada Vell", True),           # at the start of the text
    ("the coast", True),          # at the end, its article dropped on both sides
    ("Vell", True),               # a whole word of the text
    ("Vellpor", False),           # a prefix of a word is not the word
    ("port", False),              # nor a suffix
    ("llport", False),
    ("Vellport, on", True),       # the comma is deleted on both sides (SQuAD): a run of words
    ("coast Ada", False),         # the words, but not in this order
    ("", False),                  # nothing is never stated
    ("The", False),               # an answer that normalises to nothing
])
def test_a_document_holds_an_answer_only_as_whole_words(answer, stated):
    assert holds(ADA, answer) is stated


def test_a_town_whose_name_contains_the_answer_does_not_hold_it():
    assert not holds(PORT, "Vellport") and not holds(PORT, "port town is")
    assert holds(PORT, "a port town")


# ---------------------------------------------------------------------------------------------
# Scores by hand


def _reply(text: str, documents=(), confidence: float = 0.5, **fields) -> Answer:
    answer, citations, abstained = parse_reply(text)
    return Answer("q", text, answer, citations, abstained, confidence, list(documents), **fields)


def test_citation_counts_only_a_cited_document_that_states_the_answer():
    right = score(_reply("[1] Vellport", [ADA, PORT]), ["Vellport"])
    assert right["citation"] == 1.0
    substring = score(_reply("[2] Vellport", [ADA, PORT]), ["Vellport"])  # Vellportia's text: not the word
    assert substring["em"] == 1.0 and substring["citation"] == 0.0
    assert score(_reply("[3] Vellport", [ADA, PORT]), ["Vellport"])["citation"] == 0.0  # no document 3
    assert score(_reply("[0] Vellport", [ADA, PORT]), ["Vellport"])["citation"] == 0.0  # numbers start at 1
    assert score(_reply("Vellport", [ADA]), ["Vellport"])["citation"] == 0.0  # nothing cited
    # Any alias stated by any cited document: the second answer, the second citation.
    assert score(_reply("[2] [1] Vellport", [KOR, ADA]), ["Tulvania", "Vellport"])["citation"] == 1.0


def test_cited_documents_follow_the_citations_and_skip_numbers_out_of_range():
    reply = _reply("[2] [5] [1] [2] [0] x", [ADA, KOR])
    assert reply.cited == [KOR, ADA, KOR]


def test_every_score_of_an_answerable_question_by_hand():
    partial = score(_reply("[1] Vellport harbour", [ADA], confidence=0.25, seconds=1.5), ["Vellport"], ["person-1"])
    assert partial == {"em": 0.0, "f1": 2 / 3, "hallucination": 1.0, "abstain": 0.0, "false_abstention": 0.0,
                       "citation": None, "gold_in_context": 1.0, "all_gold_in_context": 1.0, "hops": 1.0,
                       "malformed": 0.0, "seconds": 1.5, "confidence": 0.25}
    assert score(replace(_reply("[1] Vellport", [ADA]), format_ok=False), ["Vellport"])["malformed"] == 1.0
    # Two gold documents, one shown (as a chunk: its parent's id counts).
    right = score(_reply("[1] Vellport", [CHUNK, PORT]), ["Vellport"], ["person-1", "company-2"])
    assert right["gold_in_context"] == 1.0 and right["all_gold_in_context"] == 0.0
    both = score(_reply("[1] x", [CHUNK, KOR]), ["Vellport"], ["person-1", "company-2"])
    assert both["gold_in_context"] == both["all_gold_in_context"] == 1.0
    none = score(_reply("[1] x", [PORT]), ["Vellport"], ["person-1"])
    assert none["gold_in_context"] == none["all_gold_in_context"] == 0.0
    # Without gold ids, or asked closed-book, there is no context to count gold in.
    assert score(_reply("[1] Vellport", [ADA]), ["Vellport"])["gold_in_context"] is None
    closed = score(_reply("Vellport", closed_book=True), ["Vellport"], ["person-1"])
    assert closed["gold_in_context"] is None and closed["all_gold_in_context"] is None and closed["hops"] == 0.0


def test_every_score_of_an_unanswerable_question_by_hand():
    answered = score(_reply("[1] Vellport", [ADA], confidence=0.75), [], [])
    assert answered == {"em": None, "f1": None, "hallucination": 1.0, "abstain": 0.0, "false_abstention": None,
                        "citation": None, "gold_in_context": None, "all_gold_in_context": None, "hops": 1.0,
                        "malformed": 0.0, "seconds": 0.0, "confidence": 0.75}
    abstained = score(_reply(ABSTAIN, [ADA]), [])
    assert abstained["hallucination"] == 0.0 and abstained["abstain"] == 1.0


def test_hops_count_the_retrievals_that_were_made():
    trace = [Hop("q", [ADA]), Hop("Kor", [KOR]), Hop("", [], "empty"), Hop("x", [], "over_max_hops")]
    assert _reply("x", hops=trace).n_hops == 2
    assert _reply("x", hops=trace[:1]).n_hops == 1
    assert _reply("x").n_hops == 1 and _reply("x", closed_book=True).n_hops == 0
    assert score(_reply("x", hops=trace), ["x"])["hops"] == 2.0


# ---------------------------------------------------------------------------------------------
# The Answerer with a scripted model


def scripted(tok: Tokenizer, reply: str, stop: bool = True) -> Scripted:
    """A tiny model that writes `reply` after the assistant header (then its end token, or nothing)."""
    t = tok.token_id
    tail = [t("<|assistant_end|>")] if stop else []
    return Scripted(tok.vocab_size, chain([t("<|assistant_start|>"), *tok.encode(reply), *tail]))


def test_the_context_is_shared_between_prompt_and_reply(tok):
    model = scripted(tok, "[1] Vellport")
    assert Answerer(model, tok, 100).prompt_tokens == 100 - 24 - 1  # default reply room: 24 tokens
    answerer = Answerer(model, tok, 60, max_answer_tokens=10)
    assert answerer.prompt_tokens == 49
    assert answerer.abstain_ids == tok.encode(ABSTAIN) + [tok.token_id("<|assistant_end|>")]
    ids, kept = answerer.prompt("Where was Ada Vell born?", [ADA, KOR, PORT])
    assert (ids, kept) == fit_prompt(answerer.renderer, "Where was Ada Vell born?", [ADA, KOR, PORT], 49)
    assert len(ids) <= 49 and 0 < len(kept) < 3
    long = "Where was Ada Vell born? " * 40
    assert answerer.fit_question(long) == answer_module.fit_question(answerer.renderer, long, 49)


def test_answers_are_greedy_replies_batch_by_batch_with_what_each_question_was_shown(tok):
    model = scripted(tok, "[1] Vellport")
    answerer = Answerer(model, tok, 70, max_answer_tokens=8, batch_size=2)
    streamed = []
    documents = [[ADA, KOR, PORT], [KOR], []]
    answers = answerer.answer(["Where was Ada Vell born?", "Who?", "Why?"], documents,
                              on_token=lambda i, token: streamed.append(i))
    for a, q, given in zip(answers, ["Where was Ada Vell born?", "Who?", "Why?"], documents):
        assert (a.question, a.reply, a.answer, a.citations, a.abstained) == (q, "[1] Vellport", "Vellport", [1], False)
        assert a.documents == answerer.prompt(q, given)[1] and a.dropped == len(given) - len(a.documents)
        assert not a.closed_book and not a.below_threshold and a.seconds > 0
    assert answers[0].dropped > 0 and answers[1].dropped == 0
    # on_token counts within a batch: questions 0 and 1, then question 2 as row 0 of the second batch.
    per_reply = len(tok.encode("[1] Vellport"))  # the end token is not streamed
    assert sorted(streamed) == [0] * 2 * per_reply + [1] * per_reply
    prompts = [answerer.prompt(q, d)[0] for q, d in zip(["Where was Ada Vell born?", "Who?", "Why?"], documents)]
    want = (1 - answerer.abstain_probability(prompts)).tolist()
    assert [a.confidence for a in answers] == pytest.approx(want, rel=1e-9)
    closed = answerer.answer(["Where was Ada Vell born?"])[0]
    assert closed.closed_book and closed.documents == [] and closed.dropped == 0 and closed.n_hops == 0


def test_the_default_batch_is_32_questions(tok):
    streamed = []
    Answerer(scripted(tok, "[1] Vellport"), tok, 40, max_answer_tokens=4).answer(
        [f"Q{i}?" for i in range(33)], on_token=lambda i, token: streamed.append(i))
    assert max(streamed) == 31 and streamed.count(0) == 2 * streamed.count(1)


def test_a_reply_stops_at_its_end_token_or_at_the_reply_room(tok):
    kor = tok.encode("Kor")[0]
    endless = Scripted(tok.vocab_size, {tok.token_id("<|assistant_start|>"): kor, kor: kor})  # never ends
    streamed = []
    Answerer(endless, tok, 60, max_answer_tokens=6).answer(["Who?"], on_token=lambda i, token: streamed.append(token))
    assert streamed == [kor] * 6  # cut at max_answer_tokens
    stopped = Answerer(scripted(tok, "[2] Kor"), tok, 120, max_answer_tokens=6).answer(["Who?"], [[ADA, KOR]])
    assert stopped[0].reply == "[2] Kor" and stopped[0].cited == [KOR]


def test_below_the_threshold_nothing_is_generated_and_the_reply_is_the_abstention(tok, monkeypatch):
    """A fake engine gives each question's P(ABSTAIN) as the score of its prefill and refuses what the
    answerer's admit refuses, as Engine.generate does (tests/test_engine.py); the real engine below."""
    confidences = {"A?": 0.9, "B?": 0.2, "C?": 0.5, "D?": 0.49}
    reply = tok.encode("[1] Vellport")

    def generate(self, prompts, on_token=None, suppress=(), admit=None):
        assert admit is not None  # the confidence is read from this generation's prefill
        scores = [math.log(1 - confidences[tok.decode(p).split("<|user_start|>")[-1].split("<|user_end|>")[0].strip()])
                  for p in prompts]
        admitted = [admit(j, logp) for j, logp in enumerate(scores)]
        for j in [j for j, ok in enumerate(admitted) if ok and on_token is not None]:
            for token in reply:
                on_token(j, token)
        return GenerationResult([reply if ok else [] for ok in admitted],
                                ["stop" if ok else "refused" for ok in admitted], scores=scores)

    monkeypatch.setattr(Answerer, "_generate", generate)
    answerer = Answerer(object(), tok, 60, max_answer_tokens=8, threshold=0.5)
    streamed = []
    answers = answerer.answer(list(confidences), on_token=lambda i, token: streamed.append(i))
    assert [a.reply for a in answers] == ["[1] Vellport", ABSTAIN, "[1] Vellport", ABSTAIN]
    assert [a.abstained for a in answers] == [False, True, False, True]
    assert [a.below_threshold for a in answers] == [False, True, False, True]  # 0.5 itself is not below
    assert [a.confidence for a in answers] == pytest.approx([0.9, 0.2, 0.5, 0.49])
    assert set(streamed) == {0, 2}  # callbacks name the question, not the row of the generated subset
    streamed.clear()
    none = answerer.answer(["B?", "D?"], on_token=lambda i, token: streamed.append(i))
    assert [a.reply for a in none] == [ABSTAIN, ABSTAIN] and streamed == []


class Nudged(torch.nn.Module):
    """A tiny random model nudged toward the abstention: at every position whose token is
    <|assistant_start|> or one of ABSTAIN's, the logit of the token that follows it there is raised by
    `nudge`, so P(ABSTAIN) is neither 0 nor 1 and differs from prompt to prompt."""

    def __init__(self, tok: Tokenizer, answerer_ids: list[int], nudge: float = 9.0, perturb: float = 0.3):
        super().__init__()
        self.inner = tiny_lm(tok.vocab_size, seed=3).double()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.inner.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * perturb)
        self.tilt = torch.zeros(tok.vocab_size, tok.vocab_size, dtype=torch.float64)
        for x, y in chain([tok.token_id("<|assistant_start|>"), *answerer_ids]).items():
            self.tilt[x, y] = nudge

    def allocate_cache(self, *args, **kwargs):
        return self.inner.allocate_cache(*args, **kwargs)

    def forward(self, idx, targets=None, cache=None, last_only=False):
        logits = self.inner(idx, cache=cache, last_only=last_only)
        return logits + self.tilt[idx[:, -logits.size(1):]]


QUESTIONS = [("Hi?", None), ("Where was Ada Vell born?", [ADA]), ("Why?", [KOR, PORT, ADA]), ("Who?", [PORT]),
             ("Where?", [ADA, KOR])]  # prompts of 7 to 88 tokens: two length groups, rows staggered in each


def _plain_confidence(model, prompt: list[int], abstain: list[int]) -> float:
    """1 - P(ABSTAIN | prompt) from one full forward over prompt + ABSTAIN, log-softmax by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + abstain]))[0, len(prompt) - 1:-1]
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return 1 - math.exp(float(logp[torch.arange(len(abstain)), abstain].sum()))


@pytest.mark.parametrize("threshold", [None, "between"])
def test_the_confidence_read_from_the_replys_own_prefill_is_a_plain_full_forwards(tok, threshold):
    """answer()'s confidence, read from each reply's prefill, against one full forward per prompt over
    prompt + ABSTAIN; with a threshold between the second and third, the same confidences, and only the questions at
    or above it generated for (streamed), the others ABSTAIN."""
    ids = Answerer(None, tok, 200).abstain_ids
    model = Nudged(tok, ids)
    answerer = Answerer(model, tok, 200, max_answer_tokens=4)
    prompts = [answerer.prompt(q, d)[0] for q, d in QUESTIONS]
    want = [_plain_confidence(model, p, ids) for p in prompts]
    assert 0.5 < min(want) and max(want) < 0.999 and len({round(w, 4) for w in want}) == len(want)
    if threshold == "between":
        # between two confidences, not at one: batched and plain forwards may differ in the last bits
        # (with 2 threads), which must not move a question across the threshold
        ranked = sorted(want)
        answerer.threshold = (ranked[1] + ranked[2]) / 2
    streamed = []
    answers = answerer.answer([q for q, _ in QUESTIONS], [d for _, d in QUESTIONS],
                              on_token=lambda i, token: streamed.append(i))
    assert [a.confidence for a in answers] == pytest.approx(want, rel=1e-9)
    if threshold == "between":
        below = [i for i, w in enumerate(want) if w < answerer.threshold]
        assert len(below) == 2 and [a.below_threshold for a in answers] == [i in below for i in range(5)]
        assert all(answers[i].reply == ABSTAIN for i in below) and not set(below) & set(streamed)
        assert set(streamed) == set(range(5)) - set(below)


class Counted(torch.nn.Module):
    """A model that counts the tokens fed to it, forward by forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.fed = inner, []

    def allocate_cache(self, *args, **kwargs):
        return self.inner.allocate_cache(*args, **kwargs)

    def forward(self, idx, *args, **kwargs):
        self.fed.append(idx.numel())
        return self.inner(idx, *args, **kwargs)


@pytest.mark.parametrize("threshold", [None, 0.5, 2.0])  # the model's call | all generated | none
def test_each_prompt_goes_through_the_model_once(tok, threshold):
    """Every token fed to the model, counted: each prompt once (its prefill, which also gives its
    confidence), ABSTAIN but its last token once per prompt (scored on a copy of the prefill's
    cache), and the reply's tokens fed back; below the threshold (2.0: every confidence) no reply."""
    model = Counted(scripted(tok, "[1] Vellport"))
    answerer = Answerer(model, tok, 200, max_answer_tokens=8, threshold=threshold)
    answers = answerer.answer([q for q, _ in QUESTIONS], [d for _, d in QUESTIONS])
    prompts = [answerer.prompt(q, d)[0] for q, d in QUESTIONS]
    generated = 0 if threshold == 2.0 else len(prompts)
    assert [a.reply for a in answers] == ([ABSTAIN] * 5 if generated == 0 else ["[1] Vellport"] * 5)
    reply = len(tok.encode("[1] Vellport"))  # each fed back; the end token that follows is not
    assert sum(model.fed) == sum(map(len, prompts)) + len(prompts) * (len(answerer.abstain_ids) - 1) + generated * reply


def _plain_abstain_probability(model, prompt: list[int], abstain: list[int]) -> float:
    """Teacher-forced, one full forward per abstention token, in float64."""
    logp = 0.0
    with torch.no_grad():
        for i, token in enumerate(abstain):
            logits = model(torch.tensor([prompt + abstain[:i]]))[0, -1].double()
            logp += float(logits.log_softmax(-1)[token])
    return math.exp(logp)


def test_abstain_probability_equals_a_plain_loop_and_restores_the_training_mode(tok):
    model = tiny_lm(tok.vocab_size, seed=3).double()
    with torch.no_grad():
        for p in model.parameters():  # a random model far from uniform, so every position matters
            p.add_(torch.randn_like(p) * 0.5)
    answerer = Answerer(model, tok, 60)
    prompts = [answerer.prompt(q, d)[0] for q, d in (("Hi?", None), ("Where was Ada Vell born?", [ADA]),
                                                      ("Why?", [KOR]))]
    model.train()
    got = answerer.abstain_probability(prompts)
    assert model.training and got.dtype == torch.float64 and not got.requires_grad
    want = [_plain_abstain_probability(model.eval(), p, answerer.abstain_ids) for p in prompts]
    # The log-softmax is taken in float32 (a float64 model too): 1e-7 of a 60-nat sum.
    assert [math.log(g) for g in got.tolist()] == pytest.approx([math.log(w) for w in want], rel=1e-6)
    assert len(set(got.tolist())) == 3
    answerer.abstain_probability(prompts[:1])
    assert not model.training  # eval stays eval
    torch.testing.assert_close(answerer.confidence(prompts), 1 - got)


# ---------------------------------------------------------------------------------------------
# Fitting the question and the documents: the edges, counted by hand


def test_a_question_is_cut_to_its_room_in_tokens_and_no_room_leaves_nothing(tok):
    renderer = ChatRenderer(tok)
    # The empty prompt: <|bos|> <|user_start|> <|user_end|> <|documents_start|> <|documents_end|>
    # <|assistant_start|>, 6 tokens; the question's room is what max_tokens leaves beyond them.
    question = "Where was Ada Vell born?"
    ids = tok.encode(question)
    assert len(ids) > 3
    assert fit_question(renderer, question, 6 + 3) == tok.decode(ids[:3])  # 24 characters, but 3 tokens of room
    assert fit_question(renderer, question, 6 + len(ids)) == question      # exactly its room: whole
    assert fit_question(renderer, question, 6 + len(ids) - 1) == tok.decode(ids[:-1])
    assert fit_question(renderer, question, 6) == "" and fit_question(renderer, question, 2) == ""  # no room


def test_past_32_characters_per_token_of_room_nothing_of_the_question_is_read():
    """A tokenizer with 64-character tokens: a question of 4 tokens' room x 32 characters and more is
    cut at 128 characters, though its tokens would fit (the bound that keeps a 5 MB question cheap)."""
    long_tokens = Tokenizer.train(["x" * 64 + " hello world"] * 50, 300)
    renderer = ChatRenderer(long_tokens)
    question = "x" * 128 + " hello"
    assert len(long_tokens.encode(question)) <= 4
    assert fit_question(renderer, question, 6 + 4) == "x" * 128
    assert fit_question(renderer, "x" * 128, 6 + 4) == "x" * 128


def test_a_prompt_exactly_max_tokens_long_keeps_its_documents(tok):
    renderer = ChatRenderer(tok)
    question = "Where was Ada Vell born?"
    with_ada = renderer.prompt([{"role": "user", "content": question, "documents": [ADA]}])
    ids, kept = fit_prompt(renderer, question, [ADA, KOR], len(with_ada))
    assert (ids, kept) == (with_ada, [ADA])
    ids, kept = fit_prompt(renderer, question, [ADA, KOR], len(with_ada) - 1)
    assert kept == [] and ids == renderer.prompt([{"role": "user", "content": question, "documents": []}])


# ---------------------------------------------------------------------------------------------
# Greedy replies, the overruled abstention and the server's steps, against plain loops


class Preferring(torch.nn.Module):
    """A tiny real model (its cache advances as usual) whose next-token logits after token a are
    prefs[a] (token: logit, every other token -1e4); after other tokens, the model's own logits."""

    def __init__(self, vocab: int, prefs: dict[int, dict[int, float]]):
        super().__init__()
        self.inner, self.prefs = tiny_lm(vocab), prefs

    def allocate_cache(self, *args, **kwargs):
        return self.inner.allocate_cache(*args, **kwargs)

    def forward(self, idx, targets=None, cache=None, last_only=False):
        logits = self.inner(idx, cache=cache, last_only=last_only).clone()
        for row, last in enumerate(idx[:, -1].tolist()):
            if last in self.prefs:
                logits[row, -1] = -1e4
                for token, value in self.prefs[last].items():
                    logits[row, -1, token] = value
        return logits


def abstaining(tok: Tokenizer) -> Preferring:
    """Writes ABSTAIN; without its first token, its second (and on, ABSTAIN's rest); without both, "Kor"."""
    ids = Answerer(None, tok, 200).abstain_ids
    kor = tok.encode("Kor")
    script = {a: {b: 0.0} for a, b in chain(ids).items()} | {a: {b: 0.0} for a, b in chain([*kor, ids[-1]]).items()}
    return Preferring(tok.vocab_size, {tok.token_id("<|assistant_start|>"): {ids[0]: 30.0, ids[1]: 20.0, kor[0]: 10.0},
                                       **script})


def _plain_greedy(model, prompt: list[int], max_new: int, stop: int, banned_first: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens by full forwards over the whole sequence, step by step; the stop token not included."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for step in range(max_new):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            if step == 0:
                logits[list(banned_first)] = -float("inf")
            token = int(logits.argmax())
            if token == stop:
                break
            out.append(token)
            ids.append(token)
    return out


def _random_model(tok: Tokenizer):
    model = tiny_lm(tok.vocab_size, seed=5).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # far from uniform, and no token near certain: sampling would differ
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return model


def test_replies_are_greedy_as_a_plain_loop_of_full_forwards(tok):
    model = _random_model(tok)
    answerer = Answerer(model, tok, 200, max_answer_tokens=6)
    streamed = {}
    answerer.answer([q for q, _ in QUESTIONS], [d for _, d in QUESTIONS],
                    on_token=lambda i, token: streamed.setdefault(i, []).append(token))
    stop = tok.token_id("<|assistant_end|>")
    want = [_plain_greedy(model, answerer.prompt(q, d)[0], 6, stop) for q, d in QUESTIONS]
    assert [streamed.get(i, []) for i in range(len(QUESTIONS))] == want
    assert len({tuple(w) for w in want}) > 1  # the prompts matter


def test_an_overruled_abstention_is_the_best_reply_without_abstains_first_token_from_one_more_prefill(tok):
    """At or above the threshold (0: always) a reply of ABSTAIN is replaced by the greedy reply whose
    first token is not ABSTAIN's first: here ABSTAIN's second token, the model's next choice. Tokens fed
    to the model: the prompt and ABSTAIN's scoring once, the reply fed back, then only the prompt again
    and the new reply (the second generation scores nothing)."""
    model = Counted(abstaining(tok))
    answerer = Answerer(model, tok, 200, max_answer_tokens=12, threshold=0.0)
    [a] = answerer.answer(["Where was Ada Vell born?"], [[ADA]])
    ids = answerer.abstain_ids
    assert a.reply == tok.decode(ids[1:-1]).strip() and a.over_abstention and not a.abstained
    prompt = answerer.prompt("Where was Ada Vell born?", [ADA])[0]
    first = len(prompt) + (len(ids) - 1) + len(tok.encode(ABSTAIN))
    assert sum(model.fed) == first + len(prompt) + len(ids[1:-1])
    # Without a threshold the model's abstention stands, and nothing is generated twice.
    model.fed.clear()
    [own] = Answerer(model, tok, 200, max_answer_tokens=12).answer(["Where was Ada Vell born?"], [[ADA]])
    assert own.reply == ABSTAIN and own.abstained and not own.over_abstention and sum(model.fed) == first


def test_the_confidence_alone_is_one_minus_a_plain_full_forwards_abstention(tok):
    ids = Answerer(None, tok, 200).abstain_ids
    model = Nudged(tok, ids)
    answerer = Answerer(model, tok, 200, max_answer_tokens=4)
    prompts = [answerer.prompt(q, d)[0] for q, d in QUESTIONS]
    want = [_plain_confidence(model, p, ids) for p in prompts]
    assert answerer.confidence(prompts).tolist() == pytest.approx(want, rel=1e-9)
    assert min(want) < 0.99  # P(ABSTAIN) far from 0: 1 + P would show


def test_the_scoring_pass_feeds_each_prompt_and_abstain_but_its_last_token_and_nothing_more(tok):
    model = Counted(abstaining(tok))
    answerer = Answerer(model, tok, 200)
    prompts = [answerer.prompt(q, d)[0] for q, d in QUESTIONS]
    answerer.abstain_probability(prompts)
    assert sum(model.fed) == sum(map(len, prompts)) + len(prompts) * (len(answerer.abstain_ids) - 1)


def test_decode_in_a_running_batch_is_the_greedy_reply_and_its_confidence_and_admit_overrides_the_threshold(tok):
    """The server's step: Answerer.decode adds one prompt to a DecodeBatch, its confidence read from
    that prefill (a plain full forward's), refused below the threshold (or where admit says no)."""
    ids = Answerer(None, tok, 200).abstain_ids
    model = Nudged(tok, ids)
    stop = tok.token_id("<|assistant_end|>")
    answerer = Answerer(model, tok, 200, max_answer_tokens=5)
    fitted = [(q, answerer.prompt(q, d)) for q, d in QUESTIONS[:3]]
    prompts = [ids for _, (ids, _) in fitted]
    batch, streamed, seqs = DecodeBatch(model), [], []
    for k, (q, p) in enumerate(fitted):
        seq, confidence = answerer.decode(batch, q, p, on_token=lambda token, k=k: streamed.append((k, token)))
        assert confidence == pytest.approx(_plain_confidence(model, p[0], ids), rel=1e-9)
        seqs.append(seq)
    while len(batch):
        batch.step()
    want = [_plain_greedy(model, p, 5, stop) for p in prompts]
    assert [s.tokens for s in seqs] == want
    assert [s.finish_reason for s in seqs] == ["stop" if len(w) < 5 else "length" for w in want]
    assert [t for k, t in streamed if k == 1] == want[1]
    # A threshold above the confidence refuses it, nothing sampled; admit decides instead where given.
    c = _plain_confidence(model, prompts[0], ids)
    answerer.threshold = c + 1e-6
    refused, _ = answerer.decode(DecodeBatch(model), *fitted[0])
    assert (refused.finish_reason, refused.tokens) == ("refused", [])
    seen = []
    admitted, _ = answerer.decode(DecodeBatch(model), *fitted[0], admit=lambda conf: seen.append(conf) or True)
    assert admitted.finish_reason != "refused" and seen == [pytest.approx(c, rel=1e-9)]
    answerer.threshold = None
    assert answerer.decode(DecodeBatch(model), *fitted[0], admit=lambda conf: False)[0].finish_reason == "refused"
    assert answerer.decode(DecodeBatch(model), *fitted[0])[0].finish_reason != "refused"
    # Weighed by coverage (rag/coverage.py), as answer() weighs it: Ada Vell's page holds "born", not
    # "Tam" or "Brel" (terms weighing alike): a third of the confidence.
    weighed = Answerer(model, tok, 200, max_answer_tokens=5, coverage=Coverage({}, 1), coverage_exponent=1.0)
    question = "Where was Tam Brel born?"
    prompt = weighed.prompt(question, [ADA])
    _, confidence = weighed.decode(DecodeBatch(model), question, prompt)
    assert confidence == pytest.approx(_plain_confidence(model, prompt[0], ids) / 3, rel=1e-9)
    # A reply ends at its end token (not streamed, not in its tokens).
    stopping = scripted(tok, "[1] Kor")
    batch = DecodeBatch(stopping)
    seq, _ = Answerer(stopping, tok, 200, max_answer_tokens=12).decode(batch, *fitted[0])
    while len(batch):
        batch.step()
    assert (seq.tokens, seq.finish_reason) == (tok.encode("[1] Kor"), "stop")


def test_decode_instead_rules_out_abstains_first_token_only(tok):
    model = abstaining(tok)
    answerer = Answerer(model, tok, 200, max_answer_tokens=12)
    stop, ids = tok.token_id("<|assistant_end|>"), answerer.abstain_ids
    prompt = answerer.prompt("Who?", [KOR])[0]
    batch = DecodeBatch(model)
    seq = answerer.decode_instead(batch, prompt)
    while len(batch):
        batch.step()
    assert seq.tokens == _plain_greedy(model, prompt, 12, stop, banned_first=(ids[0],)) == ids[1:-1]
    assert seq.finish_reason == "stop"
    short = Answerer(model, tok, 200, max_answer_tokens=2).decode_instead(DecodeBatch(model), prompt)
    assert short.max_new_tokens == 2


# ---------------------------------------------------------------------------------------------
# RankOrderReader's own steps, by hand


def test_rank_order_decides_from_the_first_document_that_suffices_with_every_field(tok):
    reader = RankOrderReader(Answerer(object(), tok, 200))
    abstains, answers = _reply(ABSTAIN), _reply("[1] Vellport", over_abstention=True)
    read = reader.decide("q", [ADA, KOR], 2, [0.25, 0.75], [abstains, answers], 1.5)
    assert (read.question, read.reply, read.answer, read.citations, read.abstained) == \
        ("q", "[2] Vellport", "Vellport", [2], False)
    assert (read.confidence, read.documents, read.dropped, read.seconds, read.read) == (0.75, [ADA, KOR], 2, 1.5, 2)
    assert read.read_confidences == [0.25, 0.75] and read.over_abstention
    none = reader.decide("q", [ADA], 3, [0.4], [abstains], 2.5)
    assert (none.question, none.reply, none.abstained, none.confidence, none.dropped, none.seconds, none.read) == \
        ("q", ABSTAIN, True, 0.4, 3, 2.5, None)
    nothing = reader.decide("q", [], 0, [], [], 0.5)
    assert nothing.confidence == 0.0 and nothing.abstained  # no document: no confidence in an answer
    assert math.isnan(reader.decide("q", [ADA, KOR], 0, [0.5, math.nan], [abstains, abstains], 0.0).confidence)


def test_rank_order_generates_every_document_without_a_threshold_else_the_first_at_or_above_it(tok):
    assert RankOrderReader(Answerer(object(), tok, 200)).generated([0.1, 0.9, 0.3]) == [0, 1, 2]
    assert RankOrderReader(Answerer(object(), tok, 200, threshold=0.3)).generated([0.1, 0.9, 0.3]) == [1]
    assert RankOrderReader(Answerer(object(), tok, 200, threshold=0.95)).generated([0.1, 0.9, 0.3]) == []
    long = "Where was Ada Vell born? " * 40
    reader = RankOrderReader(Answerer(object(), tok, 60, max_answer_tokens=10))
    cut = reader.fit_question(long)
    assert long.startswith(cut) and 0 < len(cut) < len(long)
    assert len(tok.encode(cut)) <= 49 - 6 < len(tok.encode(long[:len(cut) + 25]))  # 43 tokens of room


def test_rank_order_with_a_threshold_scores_each_pair_once_and_prefills_the_chosen_one_again(tok):
    """Tokens fed: each (question, document) prompt and ABSTAIN's scoring once, then the chosen
    document's prompt again and its reply fed back; the generation scores nothing again. A question
    with no document is the abstention, nothing fed."""
    model = Counted(scripted(tok, "[1] Vellport"))
    reader = RankOrderReader(Answerer(model, tok, 200, max_answer_tokens=8, threshold=0.5))
    [a] = reader.answer(["Where was Ada Vell born?"], [[ADA, KOR]])
    assert (a.reply, a.read) == ("[1] Vellport", 1)
    pa = reader.answerer.prompt("Where was Ada Vell born?", [ADA])[0]
    pk = reader.answerer.prompt("Where was Ada Vell born?", [KOR])[0]
    scoring = len(reader.answerer.abstain_ids) - 1
    assert sum(model.fed) == len(pa) + len(pk) + 2 * scoring + len(pa) + len(tok.encode("[1] Vellport"))
    model.fed.clear()
    [empty] = reader.answer(["Why?"], [[]])
    assert (empty.reply, empty.abstained, empty.below_threshold, empty.confidence) == (ABSTAIN, True, True, 0.0)
    assert model.fed == []
