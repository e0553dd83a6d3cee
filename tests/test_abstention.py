"""The answer-or-abstain threshold (hybridchat/rag/abstention.py): its choice against hand values and
a plain search, the Answerer and MultiHop applying it, its record in a checkpoint's meta.json read
back by load_run, and the apps' abstain_threshold setting. (The rag stage storing it, the evaluator
and chat applying it: tests/test_rag.py.)"""

import dataclasses
import json
import math
import random
from fractions import Fraction

import pytest
import torch
from conftest import CKPT_MODEL
from fake_confidence import patches

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra import checkpoint
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.rag.abstention import Calibration, calibrate, choose_threshold
from hybridchat.rag.answer import ABSTAIN, Answerer, RankOrderReader, score
from hybridchat.rag.coverage import Coverage
from hybridchat.rag.multihop import MultiHop, NoQueries
from hybridchat.training.runs import load_run, threshold_setting

NAN = float("nan")


def plain_search(confidences, target):
    """The reference: every candidate threshold (each confidence, 0 and 1) tried in turn, the largest
    whose share of answerable questions below it is at most the target, in exact fractions (the
    target as the decimal written: 0.29 is 29/100)."""
    if not confidences:
        return None
    feasible = [t for t in {0.0, 1.0, *(c for c in confidences if math.isfinite(c))}
                if Fraction(sum(c < t for c in confidences), len(confidences)) <= Fraction(str(target))]
    return max(feasible, default=0.0)


@pytest.mark.parametrize("confidences, target, expected", [
    # 10 questions: 2 may abstain -> the third-lowest confidence
    ([0.9, 0.2, 0.5, 0.7, 0.3, 0.95, 0.6, 0.8, 0.4, 0.85], 0.2, 0.4),
    ([0.2, 0.5, 0.5, 0.9], 0.5, 0.5),        # ties at the threshold stay answered
    ([0.7, 0.7, 0.7, 0.7], 0.25, 0.7),       # all tied: none can go alone
    ([0.9, 0.8, 0.3, 0.1], 0.5, 0.8),
    ([], 0.1, None),                         # no questions: no threshold
    ([0.6, 0.3, 0.9], 0.0, 0.3),             # target 0: none may abstain
    ([0.6, 0.3, 0.9], 1.0, 1.0),             # target 1: all may
    ([i / 100 for i in range(100)], 0.29, 0.29),  # 0.29 x 100 is 29 questions, not 28
    ([NAN, 0.5, 0.7], 0.34, 0.7),            # NaN is never below a threshold
])
def test_the_threshold_on_hand_computed_cases(confidences, target, expected):
    assert choose_threshold(confidences, target) == expected
    assert plain_search(confidences, target) == expected


def test_the_threshold_equals_a_plain_search_on_random_cases():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 12)
        confidences = [round(rng.random(), 1) for _ in range(n)]  # one decimal: many ties
        target = rng.choice([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9])  # as typed: decimals
        assert choose_threshold(confidences, target) == plain_search(confidences, target), (confidences, target)


def _scored(confidence, abstained, answerable=True):
    reply = ABSTAIN if abstained else "[1] Vellport"
    from hybridchat.rag.answer import Answer, parse_reply

    answer, cited, abstained = parse_reply(reply)
    return score(Answer("q", reply, answer, cited, abstained, confidence), ["Vellport"] if answerable else [])


def test_calibrate_records_the_rates_the_threshold_reaches():
    answerable = [_scored(0.9, False), _scored(0.4, False), _scored(0.6, False), _scored(0.2, True)]
    unanswerable = [_scored(0.3, False, False), _scored(0.7, False, False), _scored(0.1, True, False)]
    found = calibrate(answerable + unanswerable, 0.5, "v.jsonl", "ab12")
    # 4 answerable, 2 may abstain: the third-lowest confidence, 0.6, whether or not the model wrote
    # ABSTAIN (at 0.6 and above it answers anyway); 0.3 and 0.1 of the unanswerable ones fall below
    assert found == Calibration(0.6, 0.5, 4, 2 / 4, 3, 2 / 3, "v.jsonl", "ab12")
    assert calibrate([_scored(0.2, True), _scored(0.9, True)], 0.5, "v").threshold == 0.9
    assert Calibration.from_meta(json.loads(json.dumps(found.to_meta()))) == found
    only_unanswerable = calibrate(unanswerable, 0.1, "u")
    assert only_unanswerable.threshold is None and only_unanswerable.questions == 0
    for bad, needle in (([0.5], "must be an object"), ({**found.to_meta(), "threshold": "high"}, "abstention.threshold"),
                        ({**found.to_meta(), "threshold": 1.5}, "abstention.threshold"),
                        ({"threshold": 0.5}, "abstention")):
        with pytest.raises(ValueError, match=needle):
            Calibration.from_meta(bad)


# -- the Answerer and MultiHop applying it ----------------------------------------------------------

DOCS = [Document("person-0001", "Ada Vell", "Ada Vell was born in Vellport."),
        Document("city-0002", "Vellport", "Vellport is a city in Tulvania.")]
QUESTIONS = {"Where was Ada Vell born?": 0.9, "Who is Tam Brel?": 0.2, "Which city is in Tulvania?": 0.6}


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for d in DOCS] + list(QUESTIONS) + ["The documents do not say. [1] [2]"]
    return Tokenizer.train(texts * 20, 400)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", mlp_ratio=2, d_state=8,
                      headdim=16, chunk_size=8, sequence_len=256)
    torch.manual_seed(0)
    lm = HybridLM(cfg, vocab_size=tok.vocab_size)
    lm.init_weights()
    with torch.no_grad():  # zero-initialised output projections would make every reply the same
        for p in lm.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return lm.eval()


@pytest.fixture
def fake_confidence(monkeypatch):
    """Each prompt's confidence is its question's in QUESTIONS (tests/fake_confidence.py)."""
    def confidences(answerer, prompts):
        texts = [answerer.tokenizer.decode(p) for p in prompts]
        return [next(c for q, c in QUESTIONS.items() if q in t) for t in texts]

    for name, fake in patches(confidences).items():
        monkeypatch.setattr(Answerer, name, fake)


def test_the_answerer_abstains_below_the_threshold_without_generating_for_it(tok, model, fake_confidence):
    questions, docs = list(QUESTIONS), [DOCS] * 3
    plain = Answerer(model, tok, 256, max_answer_tokens=6).answer(questions, docs)
    assert not any(a.below_threshold for a in plain)
    assert [a.confidence for a in plain] == pytest.approx([0.9, 0.2, 0.6])
    for batch_size in (32, 1):
        streamed = set()
        answers = Answerer(model, tok, 256, max_answer_tokens=6, batch_size=batch_size, threshold=0.6).answer(
            questions, docs, on_token=lambda i, token: streamed.add(i))
        assert [a.below_threshold for a in answers] == [False, True, False]  # 0.6 itself is not below 0.6
        low = answers[1]
        assert (low.reply, low.answer, low.abstained, low.citations) == (ABSTAIN, ABSTAIN, True, [])
        assert low.confidence == pytest.approx(0.2)
        assert low.documents == plain[1].documents  # shown as without a threshold
        for i in (0, 2):  # the others answer exactly as without a threshold
            assert (answers[i].reply, answers[i].abstained) == (plain[i].reply, plain[i].abstained)
        if batch_size == 32:  # on_token's index is the question's place in its batch: question 1 never generates
            assert streamed == {0, 2}
    assert score(answers[1], ["Vellport"])["false_abstention"] == 1.0


def test_multi_hop_withholds_a_reply_below_the_threshold(tok, model, fake_confidence):
    def search(queries, shown=()):
        return [list(DOCS) for _ in queries]

    def answers(threshold):
        mh = MultiHop(model, tok, search, 256, NoQueries(), max_hops=1, max_answer_tokens=6, threshold=threshold)
        return mh.answer(list(QUESTIONS), [DOCS] * 3)

    plain, cut = answers(None), answers(0.5)
    assert [a.below_threshold for a in plain] == [False] * 3 and [a.below_threshold for a in cut] == [False, True, False]
    assert (cut[1].reply, cut[1].abstained, cut[1].citations) == (ABSTAIN, True, [])
    assert cut[1].hops == plain[1].hops and cut[1].confidence == 0.2
    assert [a.reply for a in cut[::2]] == [a.reply for a in plain[::2]]


def test_where_the_calibration_weighs_coverage_every_answerer_decides_on_the_weighed_confidence(tok, model,
                                                                                                 fake_confidence):
    """confidence x coverage ** 2, each question's terms weighing alike (no document frequencies): Ada
    Vell's all found (x 1), Tam Brel's none (x 0), "city"/"Tulvania" half where only Tulvania's page is
    shown (x 1/4): 0.9, 0, 0.15, so a threshold of 0.2 refuses the last though its confidence is 0.6."""
    tulvania = Document("country-0003", "Tulvania", "Tulvania is far away.")
    questions, shown = list(QUESTIONS), [DOCS, DOCS, [tulvania]]
    weighing = dict(threshold=0.2, coverage=Coverage({}, 1), coverage_exponent=2.0)
    answers = Answerer(model, tok, 256, max_answer_tokens=6, **weighing).answer(questions, shown)
    assert [a.confidence for a in answers] == pytest.approx([0.9, 0.0, 0.15])
    assert [a.below_threshold for a in answers] == [False, True, True]
    assert answers[1].reply == answers[2].reply == ABSTAIN  # refused after the prefill, nothing generated

    mh = MultiHop(model, tok, lambda queries, shown=(): [list(DOCS) for _ in queries], 256, NoQueries(), max_hops=1,
                  max_answer_tokens=6, **weighing)
    hops = mh.answer(questions, shown)
    assert [a.confidence for a in hops] == pytest.approx([0.9, 0.0, 0.15])
    assert [a.below_threshold for a in hops] == [False, True, True]

    # each document alone: Ada Vell's page covers her question, Vellport's does not; Tulvania's covers half
    # of the third, Vellport's ("a city in Tulvania") all of it, so it is read from there
    read = RankOrderReader(Answerer(model, tok, 256, max_answer_tokens=6, **weighing)).answer(
        [questions[0], questions[2]], [DOCS, [tulvania, DOCS[1]]])
    assert [a.read_confidences for a in read] == [pytest.approx([0.9, 0.0]), pytest.approx([0.15, 0.6])]
    assert [a.read for a in read] == [1, 2]
    # without the weighing (exponent 0), the confidences are the model's
    plain = Answerer(model, tok, 256, max_answer_tokens=6, threshold=0.2, coverage=Coverage({}, 1)).answer(
        questions, shown)
    assert [a.confidence for a in plain] == pytest.approx([0.9, 0.2, 0.6])


class AlwaysAbstains(torch.nn.Module):
    """The test model with its logits pushed toward writing ABSTAIN: after the reply's first position
    (the prompt's last token) the abstention's first token, after each abstention token the next one.
    Where that first token is ruled out, the model's own logits decide from then on."""

    def __init__(self, model, tok, prompt_end: int, stop: int):
        super().__init__()
        self.model = model
        ids = tok.encode(ABSTAIN)
        self.next = dict(zip([prompt_end] + ids, ids + [stop]))

    def forward(self, idx, cache=None, last_only=False):
        logits = self.model(idx, cache=cache, last_only=last_only).clone()
        tokens = idx[:, -1:] if last_only else idx
        for (b, t), token in zip(torch.cartesian_prod(torch.arange(tokens.size(0)), torch.arange(tokens.size(1))),
                                 tokens.flatten().tolist()):
            if token in self.next:
                logits[b, t, self.next[token]] += 100.0
        return logits

    def allocate_cache(self, *args, **kwargs):
        return self.model.allocate_cache(*args, **kwargs)


def greedy_without_first(model, prompt, banned, stop, max_new):
    """The reference: full forwards, no cache; the first token is the best one not banned."""
    out = []
    for step in range(max_new):
        logits = model(torch.tensor([prompt + out]))[0, -1].clone()
        if step == 0:
            logits[banned] = -float("inf")
        token = int(logits.argmax())
        if token == stop:
            break
        out.append(token)
    return out


@pytest.fixture
def abstaining(tok, model):
    answerer = Answerer(model, tok, 256, max_answer_tokens=6)
    prompt_end = answerer.prompt(list(QUESTIONS)[0], DOCS)[0][-1]
    return AlwaysAbstains(model, tok, prompt_end, answerer.renderer.stop_token).eval()


def test_at_or_above_the_threshold_the_model_answers_where_it_would_abstain(tok, abstaining, fake_confidence):
    questions, docs = list(QUESTIONS), [DOCS] * 3
    plain = Answerer(abstaining, tok, 256, max_answer_tokens=6).answer(questions, docs)
    assert [a.reply for a in plain] == [ABSTAIN] * 3 and not any(a.over_abstention for a in plain)
    answerer = Answerer(abstaining, tok, 256, max_answer_tokens=6, threshold=0.5)
    answers = answerer.answer(questions, docs)
    assert [a.over_abstention for a in answers] == [True, False, True]
    assert [a.below_threshold for a in answers] == [False, True, False]
    assert answers[1].reply == ABSTAIN
    stop, banned = answerer.renderer.stop_token, tok.encode(ABSTAIN)[:1]
    for i in (0, 2):
        expected = greedy_without_first(abstaining, answerer.prompt(questions[i], DOCS)[0], banned, stop, 6)
        assert expected[0] != banned[0] and answers[i].reply == tok.decode(expected).strip()
        assert not answers[i].abstained


def test_multi_hop_answers_where_it_would_abstain_at_or_above_the_threshold(tok, abstaining, fake_confidence):
    def search(queries, shown=()):
        return [list(DOCS) for _ in queries]

    mh = MultiHop(abstaining, tok, search, 256, NoQueries(), max_hops=1, max_answer_tokens=6, threshold=0.5)
    answers = mh.answer(list(QUESTIONS), [DOCS] * 3)
    single = Answerer(abstaining, tok, 256, max_answer_tokens=6, threshold=0.5).answer(list(QUESTIONS), [DOCS] * 3)
    assert [a.over_abstention for a in answers] == [True, False, True]
    assert [a.reply for a in answers] == [a.reply for a in single]  # one hop: the same prompt, the same reply
    assert answers[1].below_threshold and answers[1].reply == ABSTAIN


# -- stored with the checkpoint, read back, and the setting -------------------------------------------

@pytest.fixture
def step_folder(tmp_path):
    torch.manual_seed(0)
    lm = HybridLM(CKPT_MODEL, vocab_size=300)
    lm.init_weights()
    tokenizer = Tokenizer.train(["some text for a tokenizer"], 300)
    meta = {"config": {"model": dataclasses.asdict(CKPT_MODEL)}, "tokenizer": tokenizer.fingerprint}
    return checkpoint.save(tmp_path / "run" / "rag", 4, lm, [], meta, keep=1, tokenizer=tokenizer)


def test_a_stored_threshold_reads_back_and_the_checksums_stay_valid(step_folder):
    before = checkpoint.read_meta(step_folder)
    run = load_run(step_folder)  # none stored: exactly as before thresholds
    assert run.calibration is None and run.abstain_threshold() is None and run.abstain_threshold(0.3) == 0.3
    found = Calibration(0.42, 0.1, 40, 0.1, 10, 0.8, "val.jsonl", "ab12")
    checkpoint.update_meta(step_folder, {"abstention": found.to_meta()})
    after = json.loads((step_folder / "meta.json").read_text())
    assert {k: v for k, v in after.items() if k != "abstention"} == before  # sha256 of the weights included
    assert sorted(p.name for p in step_folder.iterdir()) == sorted(["meta.json", "model.safetensors",
                                                                    "optimizer.safetensors", "tokenizer.json"])
    (step_folder / "tokenizer.json").write_text((step_folder / "tokenizer.json").read_text() + " ")
    with pytest.raises(UserError, match="tokenizer.json is corrupted"):  # the checksums are still checked
        load_run(step_folder)
    (step_folder / "tokenizer.json").write_text((step_folder / "tokenizer.json").read_text()[:-1])
    run = load_run(step_folder)
    assert run.calibration == found
    assert run.abstain_threshold() == run.abstain_threshold("checkpoint") == 0.42
    assert run.abstain_threshold(0.7) == 0.7 and run.abstain_threshold(None) is None and run.abstain_threshold(0) == 0
    checkpoint.update_meta(step_folder, {"abstention": {**found.to_meta(), "threshold": "high"}})
    with pytest.raises(UserError, match=r"meta.json: 'abstention.threshold' must be a number in \[0, 1\]"):
        load_run(step_folder).abstain_threshold()


@pytest.mark.parametrize("value", ["abc", 1.5, -0.1, True, NAN, "Checkpoint"])
def test_a_bad_abstain_threshold_is_one_error_naming_the_key(value):
    with pytest.raises(UserError, match=r"^abstain_threshold=.* must be a number in \[0, 1\], null .* or checkpoint"):
        threshold_setting(value)


@pytest.mark.parametrize("value", [0, 1, 0.5, None, "checkpoint"])
def test_good_abstain_thresholds_pass(value):
    assert threshold_setting(value) == value


@pytest.mark.parametrize("value, ok", [(None, True), (0.0, True), (0.1, True), (1.0, False), (-0.1, False)])
def test_the_stage_target_is_range_checked_before_anything_is_built(value, ok):
    from hybridchat.training.stages.rag import RagConfig

    if ok:
        RagConfig(target_false_abstention=value).check()
    else:
        with pytest.raises(UserError, match=rf"^stage.target_false_abstention={value} must be in \[0, 1\) or null"):
            RagConfig(target_false_abstention=value).check()
