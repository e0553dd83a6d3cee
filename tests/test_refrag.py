"""Multi-hop answering (hybridchat/rag/multihop.py) and the refrag stage: the query hook round trip on a
tiny model, rendering of queries and retrieved documents in both chat formats, training traces
whose retrieved tokens carry no loss, rewards and GRPO advantages on hand-made cases, and a smoke
refrag run (warm start, then RL steps) from smoke checkpoints."""

import json
import math
from itertools import islice

import pytest
import test_rag
import torch
from conftest import assert_evaluation_changed_no_training, compose_config, train_at_eval_cadence
from test_rag import train
from torch import nn

from hybridchat.core.documents import Document
from hybridchat.core.metrics import exact_match
from hybridchat.data.chat import ChatRenderer
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra import checkpoint
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.rag.multihop import BridgeQueries, Hop, MultiHop, NoQueries, QueryGenerator, Search, search_text
from hybridchat.retrieval.base import Hit
from hybridchat.training.runs import load_run

# One xdist worker for the whole file (make test's --dist loadgroup): its module fixtures train the smoke pipeline and
# a refrag run once for the file; torchrun tests.
pytestmark = pytest.mark.xdist_group("refrag")

ADA = Document("person-0001", "Ada Vell", "Ada Vell was born in Vellport. She works at Kor Industries.")
KOR = Document("company-0002", "Kor Industries", "Kor Industries was founded by Tam Brel in Vellport.")
VELLPORT = Document("city-0003", "Vellport", "Vellport is a city in Tulvania.")
DOCS = [ADA, KOR, VELLPORT]
QUESTION = "Who founded the company Ada Vell works for?"


def tokenizer() -> Tokenizer:
    texts = [f"{d.title} {d.text}" for d in DOCS] + [QUESTION, "The documents do not say. [1] [2] [3] [4]"]
    return Tokenizer.train(texts * 20, 420)


class TitleRetriever:
    """Ranks documents by how many words of their title the query holds; records every query."""

    def __init__(self, documents=DOCS):
        self.documents, self.queries = documents, []

    def search(self, queries, top_k, filters=None):
        self.queries += list(queries)
        out = []
        for q in queries:
            scored = [(sum(w in q for w in d.title.split()), i, d) for i, d in enumerate(self.documents)]
            ranked = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:top_k]
            out.append([Hit(d, float(s), r) for r, (s, _, d) in enumerate(ranked, 1)])
        return out


def tiny_lm(vocab: int, seed: int = 0) -> HybridLM:
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", mlp_ratio=2, d_state=8,
                      headdim=16, chunk_size=8, sequence_len=512)
    torch.manual_seed(seed)
    model = HybridLM(cfg, vocab_size=vocab)
    model.init_weights()
    return model.eval()


class Scripted(nn.Module):
    """A tiny real model (its cache advances as usual) whose next token is forced by a bigram script:
    after token a comes script[a]; unscripted tokens keep the model's own logits."""

    def __init__(self, vocab: int, script: dict[int, int]):
        super().__init__()
        self.inner = tiny_lm(vocab)
        self.script = script

    def allocate_cache(self, *args, **kwargs):
        return self.inner.allocate_cache(*args, **kwargs)

    def forward(self, idx, targets=None, cache=None, last_only=False, reduction="mean"):
        logits = self.inner(idx, cache=cache, last_only=last_only).clone()
        for row, last in enumerate(idx[:, -1].tolist()):
            if last in self.script:
                logits[row, -1] = -1e4
                logits[row, -1, self.script[last]] = 1e4
        return logits


def chain(tokens: list[int]) -> dict[int, int]:
    return dict(zip(tokens, tokens[1:]))


def script_query_then_answer(tok: Tokenizer, query: str, answer: str) -> dict[int, int]:
    """<|assistant_start|> -> the query -> (documents injected) -> the answer -> <|assistant_end|>."""
    t = tok.token_id
    return {**chain([t("<|assistant_start|>"), t("<|query_start|>"), *tok.encode(query), t("<|query_end|>")]),
            **chain([t("<|documents_end|>"), *tok.encode(answer), t("<|assistant_end|>")])}


def multihop(model, tok, retriever, **kwargs) -> MultiHop:
    options = dict(max_context=512, max_hops=2, max_query_tokens=8, max_answer_tokens=8, hop_tokens=64)
    return MultiHop(model, tok, Search(retriever, top_k=kwargs.pop("top_k", 1)), **{**options, **kwargs})


def test_a_written_query_is_parsed_retrieved_and_its_documents_appended_numbered_on():
    tok = tokenizer()
    model = Scripted(tok.vocab_size, script_query_then_answer(tok, "Kor Industries", "[2] Tam Brel"))
    retriever = TitleRetriever()
    mh = multihop(model, tok, retriever)
    [t] = mh.rollouts([QUESTION])
    assert retriever.queries == [QUESTION, "Kor Industries"]
    assert [(h.query, [d.id for d in h.documents], h.status) for h in t.hops] == [
        (QUESTION, ["person-0001"], "ok"), ("Kor Industries", ["company-0002"], "ok")]
    renderer = ChatRenderer(tok)
    injected = renderer.results([KOR], 2)
    query = renderer.query("Kor Industries")
    assert t.tokens == query + injected + tok.encode("[2] Tam Brel") + [renderer.stop_token]
    # The model wrote the query and the answer; the documents were injected.
    assert [x for x, w in zip(t.tokens, t.written) if not w] == injected
    assert tok.decode([x for x, w in zip(t.tokens, t.written) if w]).startswith("<|query_start|>Kor Industries")
    assert "[2] Kor Industries (company-0002)" in tok.decode(injected)
    [a] = mh.answer([QUESTION])
    assert (a.answer, a.citations, a.abstained, a.format_ok, a.n_hops) == ("Tam Brel", [2], False, True, 2)
    assert [d.id for d in a.cited] == ["company-0002"]


def test_a_query_citing_its_source_is_searched_without_the_citation():
    tok = tokenizer()
    abstain = "The documents do not say."
    for query, searched, status in (("[1] Kor Industries", ["Kor Industries"], "ok"), ("[1]", [], "empty")):
        retriever = TitleRetriever()
        mh = multihop(Scripted(tok.vocab_size, script_query_then_answer(tok, query, abstain)), tok, retriever)
        [t] = mh.rollouts([QUESTION])
        assert retriever.queries == [QUESTION, *searched]
        assert [(h.query, search_text(h.query), h.status) for h in t.hops[1:]] == [(query, " ".join(searched), status)]
        assert [d.id for d in t.hops[1].documents] == (["company-0002"] if searched else [])


def test_max_hops_is_respected_and_a_query_past_it_is_refused_without_retrieval():
    tok = tokenizer()
    t_ = tok.token_id
    # After every documents section the script writes the same query again: it never stops asking.
    script = {**chain([t_("<|assistant_start|>"), t_("<|query_start|>"), *tok.encode("Vellport"), t_("<|query_end|>")]),
              t_("<|documents_end|>"): t_("<|query_start|>")}
    for max_hops in (1, 2, 3):
        retriever = TitleRetriever()
        mh = multihop(Scripted(tok.vocab_size, script), tok, retriever, max_hops=max_hops, max_answer_tokens=12)
        [t] = mh.rollouts([QUESTION])
        assert len(retriever.queries) == max_hops  # the question's own retrieval + max_hops - 1 queries
        statuses = [h.status for h in t.hops]
        assert statuses[:max_hops] == ["ok"] * max_hops and set(statuses[max_hops:]) == {"over_max_hops"}
        assert len(statuses) > max_hops and t.finish == "length"
        [a] = mh.answer([QUESTION])
        assert a.abstained and not a.format_ok and a.n_hops == max_hops  # no answer written: none given


def test_an_empty_query_ends_gracefully_and_a_query_end_is_never_written_outside_a_query():
    tok = tokenizer()
    t_ = tok.token_id
    answer = {**chain([t_("<|documents_end|>"), *tok.encode("[1] Tam Brel"), t_("<|assistant_end|>")])}
    empty = {**chain([t_("<|assistant_start|>"), t_("<|query_start|>"), t_("<|query_end|>")]), **answer}
    retriever = TitleRetriever()
    [a] = multihop(Scripted(tok.vocab_size, empty), tok, retriever).answer([QUESTION])
    assert retriever.queries == [QUESTION]  # no retrieval for it
    assert [h.status for h in a.hops] == ["ok", "empty"] and a.hops[1].documents == []
    assert (a.answer, a.citations, a.abstained, a.n_hops, a.format_ok) == ("Tam Brel", [1], False, 1, False)
    # A model that would close its reply as a query it never opened ("Kor<|query_end|>", the end
    # marker first or after words): the end marker is ruled out there, so no query and no retrieval.
    for opening in ([*tok.encode("Kor")], []):
        closing = {**chain([t_("<|assistant_start|>"), *opening, t_("<|query_end|>")]), **answer}
        retriever = TitleRetriever()
        mh = multihop(Scripted(tok.vocab_size, closing), tok, retriever)
        [t] = mh.rollouts([QUESTION])
        assert t_("<|query_end|>") not in t.tokens and t.tokens[:len(opening)] == opening
        assert retriever.queries == [QUESTION] and [h.status for h in t.hops] == ["ok"]


def test_single_shot_refuses_model_queries_and_bridge_queries_are_written_for_the_model():
    tok = tokenizer()
    model = Scripted(tok.vocab_size, script_query_then_answer(tok, "Kor Industries", "[2] Tam Brel"))
    retriever = TitleRetriever()
    [a] = multihop(model, tok, retriever, queries=NoQueries()).answer([QUESTION])
    assert retriever.queries == [QUESTION] and [h.status for h in a.hops] == ["ok", "over_max_hops"]
    # The bridge rule: names in the hop-1 document that the question does not hold.
    hop1 = [Hop(QUESTION, [ADA])]
    query = BridgeQueries().query(QUESTION, hop1)
    assert "Kor Industries" in query and "Vellport" in query and "Ada Vell" not in query.replace(QUESTION, "")
    t_ = tok.token_id
    answer_only = chain([t_("<|documents_end|>"), *tok.encode("[2] Tam Brel"), t_("<|assistant_end|>")])
    retriever = TitleRetriever()
    mh = multihop(Scripted(tok.vocab_size, answer_only), tok, retriever, queries=BridgeQueries())
    [t] = mh.rollouts([QUESTION])
    assert retriever.queries == [QUESTION, query]
    assert t.hops[1].forced and t.hops[1].documents and all(t.written)  # forced into the prompt, not injected
    renderer = ChatRenderer(tok)
    forced = renderer.query(query) + renderer.results(t.hops[1].documents, 2)
    assert t.prompt[-len(forced):] == forced


def test_written_and_forced_hops_get_the_same_room_for_their_documents():
    """A hop's documents are shown when the prompt, the reply so far and their results section (its
    markers included) leave max_answer_tokens + 1 tokens free. The hook counted the section's two
    markers twice, so a query the model wrote lost documents that the same query forced kept."""
    tok = tokenizer()
    renderer = ChatRenderer(tok)
    query = "Kor Industries"

    class Forced(QueryGenerator):
        def query(self, question, hops):
            return query

    prompt = len(renderer.prompt([{"role": "user", "content": QUESTION, "documents": [ADA]}]))
    exact = prompt + len(renderer.query(query)) + len(renderer.results([KOR], 2)) + 8 + 1  # by hand: no token to spare
    for max_context, fits in ((exact, True), (exact - 1, False)):
        model = Scripted(tok.vocab_size, script_query_then_answer(tok, query, "[2] Tam Brel"))
        mh = multihop(model, tok, TitleRetriever(), max_context=max_context, max_answer_tokens=8, hop_tokens=1)
        [t] = mh.rollouts([QUESTION], first=[[ADA]])
        assert [d.id for d in t.hops[0].documents] == ["person-0001"]
        shown = ["company-0002"] if fits else []
        assert (t.hops[1].status, [d.id for d in t.hops[1].documents]) == ("ok" if fits else "no_room", shown)
        forced = mh.plan(QUESTION, [ADA], queries=Forced())
        assert [(h.query, [d.id for d in h.documents]) for h in forced[1:]] == [(query, shown)]


def test_a_question_longer_than_the_first_hop_s_room_is_cut_before_the_model_runs():
    tok = tokenizer()
    model = Scripted(tok.vocab_size, script_query_then_answer(tok, "Kor Industries", "[2] Tam Brel"))
    retriever = TitleRetriever()
    mh = multihop(model, tok, retriever, max_context=200)
    long = QUESTION + " Kor Industries" * 100_000
    [t] = mh.rollouts([long])
    room = 200 - (8 + 1 + 8 + 2 + 64)  # by hand: max_context less the answer's and one more hop's room
    assert len(t.prompt) <= room and long.startswith(t.hops[0].query) and len(t.hops[0].query) > len(QUESTION)
    assert retriever.queries[0] == t.hops[0].query  # retrieval searched what the model read
    [a] = mh.answer([long])
    assert a.question == long and a.hops[0].query == t.hops[0].query


def test_random_models_never_break_the_trace():
    """Sampling from untrained models: whatever they write, retrievals stay within max_hops, the
    injected tokens are exactly the results sections, and every trajectory is parsed."""
    tok = tokenizer()
    model = tiny_lm(tok.vocab_size, seed=3)
    with torch.no_grad():  # make the query tokens likely so hooks fire often
        model.lm_head.weight[tok.token_id("<|query_start|>")] += 1.0
        model.lm_head.weight[tok.token_id("<|query_end|>")] += 1.0
    retriever = TitleRetriever()
    mh = multihop(model, tok, retriever, max_hops=2, max_query_tokens=4, max_answer_tokens=6, top_k=2)
    trajectories = mh.rollouts([QUESTION, "Where was Ada Vell born?"], num_samples=8, temperature=1.0, seed=0)
    renderer = ChatRenderer(tok)
    fired = 0
    for t in trajectories:
        assert sum(h.status == "ok" for h in t.hops) <= 2
        injected = [x for x, w in zip(t.tokens, t.written) if not w]
        expected, first = [], len(t.hops[0].documents) + 1
        for h in t.hops[1:]:
            expected += renderer.results(h.documents, first)
            first += len(h.documents)
        assert injected == expected
        fired += len(t.hops) - 1
        # Every trajectory reads back: the reply is the text after the last injection (its end token
        # dropped), and one that ran out or had a query refused is never well-formed.
        text, ok = mh.reply(t)
        tail = t.tokens[t.answer_start:len(t.tokens) - (t.finish == "stop")]
        assert text == tok.decode(tail).strip()
        assert not ok or (t.finish == "stop" and all(h.status == "ok" for h in t.hops))
        # the end marker only ever closes a query the reply opened
        written = [x for x, w in zip(t.tokens, t.written) if w]
        ends = [i for i, x in enumerate(written) if x == tok.token_id("<|query_end|>")]
        assert all(tok.token_id("<|query_start|>") in written[:i] for i in ends)
    assert fired > 0


def test_a_trace_renders_queries_as_learned_and_retrieved_documents_as_given_in_both_formats():
    from test_chat import chatml_tokenizer

    trace = [{"role": "user", "content": QUESTION, "documents": [VELLPORT, ADA]},
             {"role": "assistant", "content": "[3] Tam Brel", "hops": [{"query": "Kor Industries", "documents": [KOR]}]}]
    tok = tokenizer()
    ids, mask = ChatRenderer(tok).render(trace)
    text = tok.decode(ids)
    assert text.endswith("<|assistant_start|><|query_start|>Kor Industries<|query_end|><|documents_start|>"
                         "<|document_start|>[3] Kor Industries (company-0002)\nKor Industries was founded by Tam Brel "
                         "in Vellport.<|document_end|><|documents_end|>[3] Tam Brel<|assistant_end|>")
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "<|query_start|>Kor Industries<|query_end|>[3] Tam Brel<|assistant_end|>"
    chatml = chatml_tokenizer()
    ids, mask = ChatRenderer(chatml).render(trace)
    assert chatml.decode(ids).endswith("<|im_start|>assistant\nSearch: Kor Industries\nDocuments:\n\n[3] Kor Industries "
                                       "(company-0002)\nKor Industries was founded by Tam Brel in Vellport.\n\n"
                                       "[3] Tam Brel<|im_end|>\n")
    assert chatml.decode([i for i, m in zip(ids, mask) if m]) == "Search: Kor Industries\n[3] Tam Brel<|im_end|>"
    assert ChatRenderer(chatml).query_markers == ("Search: ", "\n")


# -- the refrag stage at smoke size -------------------------------------------------------------------

smoke_checkpoints = test_rag.pipeline  # the `pipeline` fixture: smoke pretrain -> mid -> rag checkpoints

# Room for a question, two hop-1 documents, a query and its documents at smoke size.
REFRAG = ["stage=refrag", "model.sequence_len=512", "stage.hop_tokens=160", "stage.eval_questions=6",
          "stage.eval_every=100", "stage.hop_documents=1", "stage.rl_steps=0"]


def refrag_stage(out, common, *extra):
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.train import typed_config
    from hybridchat.training.stages.refrag import RefragStage

    config, _ = typed_config(compose_config(common + REFRAG + list(extra), output_dir=out / "stage"))
    return RefragStage(RunContext(config, Runtime(torch.device("cpu"), None)))


def test_warm_start_traces_query_the_bridge_and_carry_no_loss_on_retrieved_documents(smoke_checkpoints):
    out, common = smoke_checkpoints
    stage = refrag_stage(out, common, "stage.needless_query=0")
    tok = stage.ctx.tokenizer
    traced = answered = 0
    for i in range(12):
        ids, mask = stage.warm_start.example(i, 0)
        q = stage.train_hops[i]
        text = tok.decode(ids)
        written = tok.decode([t for t, m in zip(ids, mask) if m])
        if "<|query_start|>" not in text:
            continue
        traced += 1
        bridge = stage.titles[q.gold_doc_ids[1]]
        # the query cites the hop-1 document naming the bridge entity, then names it
        query = text.split("<|query_start|>")[1].split("<|query_end|>")[0]
        source = int(query[1:query.index("]")])
        assert query == f"[{source}] {bridge}" and written.startswith(f"<|query_start|>{query}<|query_end|>")
        named_in = text.split("<|document_start|>")[source]
        assert f"({q.gold_doc_ids[0]})" in named_in.split("\n")[0] and bridge in named_in
        # every retrieved token (both documents sections, user turn's and reply's) is given, not learned
        assert "<|document_start|>" not in written and "<|documents_start|>" not in written
        reply = text.split("<|documents_end|>")[-1]
        assert written.endswith(reply) and reply.endswith("<|assistant_end|>")
        if not reply.startswith("The documents do not say."):
            number = int(reply[1:reply.index("]")])
            document = text.split("<|document_start|>")[number]
            assert document.startswith(f"[{number}] ") and f"({q.gold_doc_ids[1]})" in document.split("\n")[0]
            assert q.answers[0] in document
            answered += 1
    assert traced >= 8 and answered >= 4
    # the single-hop examples follow the traces
    ids, mask = stage.warm_start.example(len(stage.train_hops), 0)
    assert "<|query_start|>" not in tok.decode(ids)


def test_your_2_hop_questions_are_read_as_written_and_a_row_without_two_gold_ids_is_named_by_line(smoke_checkpoints,
                                                                                                   tmp_path):
    from hybridchat.core.errors import UserError
    from hybridchat.data.world import World, WorldConfig

    out, common = smoke_checkpoints
    meta = checkpoint.read_meta(checkpoint.latest(out / "checkpoints" / "p" / "rag"))
    asked = World.generate(WorldConfig(**meta["config"]["world"])).questions("train", 2)[:12]
    rows = [json.dumps({"question": q.question, "answers": list(q.answers), "gold_doc_ids": list(q.gold_doc_ids)})
            for q in asked]
    good = tmp_path / "q2.jsonl"
    good.write_text("\n".join(rows) + "\n")
    stage = refrag_stage(out, common, f"stage.hop_questions={good}")
    read = sorted((q.question, q.answers, q.gold_doc_ids) for q in stage.val_hops + stage.train_hops)
    assert read == sorted((q.question, q.answers, q.gold_doc_ids) for q in asked)
    bad = tmp_path / "bad.jsonl"
    one_gold = json.loads(rows[1]) | {"gold_doc_ids": [asked[1].gold_doc_ids[0]]}
    bad.write_text("\n".join([rows[0], "", json.dumps(one_gold)]) + "\n")
    with pytest.raises(UserError, match=rf"^stage.hop_questions: {bad}:3: needs an answer and two gold_doc_ids"):
        refrag_stage(out, common, f"stage.hop_questions={bad}")


def test_needless_queries_are_not_taught_to_open_and_the_answer_still_cites_the_first_documents(smoke_checkpoints):
    out, common = smoke_checkpoints
    stage = refrag_stage(out, common, "stage.needless_query=1", "stage.bridge_questions=0")  # every single-hop item
    tok = stage.ctx.tokenizer
    queried = 0
    for i in range(len(stage.train_hops), len(stage.train_hops) + 16):
        ids, mask = stage.warm_start.example(i, 0)
        q = stage.train_questions[i - len(stage.train_hops)]  # epoch 0: single-hop item k is question k
        text, written = tok.decode(ids), tok.decode([t for t, m in zip(ids, mask) if m])
        if "<|query_start|>" not in text:  # its example would abstain: rag's example instead
            continue
        queried += 1
        query = text.split("<|query_start|>")[1].split("<|query_end|>")[0]
        source = int(query[1:query.index("]")])
        assert query == f"[{source}] {q.answers[0]}"  # the answer itself, where it was read
        reply = text.split("<|documents_end|>")[-1]
        # not the opening marker, nor any document: how to go on once a query is open, not to open one
        assert written == f"{query}<|query_end|>{reply}"
        assert reply == f"[{source}] {q.answers[0]}<|assistant_end|>"  # from the first documents still
        document = text.split("<|document_start|>")[source]
        assert any(f"({g})" in document.split("\n")[0] for g in q.gold_doc_ids) and q.answers[0] in document
    assert queried >= 6


@pytest.fixture(scope="module")
def refrag_run(smoke_checkpoints, tmp_path_factory):
    """A smoke refrag run from the smoke rag checkpoint: 4 warm-start steps, then 2 GRPO steps."""
    out, common = smoke_checkpoints
    run_dir = tmp_path_factory.mktemp("refrag")
    train(common + REFRAG + ["stage.rl_steps=2", "stage.group_size=2", "stage.reward_gold=0.5",
                             "stage.reward_format=0.1", "stage.hop_cost=0.05", "stage.kl_coef=0.1",
                             "stage.keep_checkpoints=1"], run_dir)
    return out, run_dir


def test_refrag_smoke_run_warm_start_then_grpo_steps_from_the_rag_checkpoint(refrag_run):
    out, run_dir = refrag_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # The GRPO steps (5 and 6) log their rewards, terms, hops and accuracy beside the loss; warm-start steps do not.
    rl = [r for r in records if "rl/reward" in r]
    assert [r["step"] for r in rl] == [5, 6]
    assert all({"rl/em", "rl/gold", "rl/format", "rl/hops", "rl/accuracy", "rl/kl"} <= set(r) for r in rl)
    final = [r for r in records if "val/em" in r][-1]
    assert {"val/bpb", "val/f1", "val/both_gold", "val/hops", "val/em_1hop", "val/queried_1hop"} <= set(final)
    assert 1.0 <= final["val/hops"] <= 2.0
    latest = checkpoint.latest(out / "checkpoints" / "p" / "refrag")
    assert latest.name == "step_000006" and checkpoint.read_meta(latest)["config"]["stage"]["source"] == "rag"
    # the warm start's end (step 4: no checkpoint_every multiple) is saved and outlives keep_checkpoints=1
    kept = [p.name for p in checkpoint.list_checkpoints(latest.parent)]
    assert kept == ["step_000004", "step_000006"]


def test_evaluating_more_often_trains_the_same_weights_through_warm_start_and_grpo(smoke_checkpoints, tmp_path):
    """Multi-hop evaluation between GRPO steps takes nothing from the rollouts' streams: the same
    weights whether it runs every other step or only at both ends. The KL term and the graded rewards
    make the weights depend on the very trajectories sampled (a smoke model's exact-match rewards are
    all 0: no advantage, no gradient, whatever it sampled)."""
    out, _ = smoke_checkpoints
    overrides = ["debug=smoke", *REFRAG, "stage.eval_questions=4", "stage.rl_steps=2", "stage.group_size=2",
                 "stage.reward_gold=0.5", "stage.reward_format=0.1", "stage.hop_cost=0.05", "stage.kl_coef=0.1",
                 "stage.length_grouping=1", f"stage.source={out / 'checkpoints' / 'p' / 'rag'}"]
    runs = [train_at_eval_cadence(train, overrides, out, tmp_path, "refrag", every) for every in (2, 100)]
    assert_evaluation_changed_no_training(*runs)


def test_rl_continues_another_runs_warm_start_named_by_its_checkpoint_folder(refrag_run, tmp_path):
    """stage.source as a path: GRPO steps in a new run from the warm start's checkpoint, without
    repeating the warm start; a path that holds no checkpoint is one error line."""
    from hybridchat.core.errors import UserError

    out, _ = refrag_run
    warm = out / "checkpoints" / "p" / "refrag"
    stage = refrag_stage(out, ["debug=smoke", f"paths.outputs={out}", "run_name=rl"], f"stage.source={warm}",
                         "stage.num_steps=1", "stage.rl_steps=1", "stage.group_size=2")
    assert stage.ctx.source_checkpoint == checkpoint.latest(warm)  # a stage folder: its latest step
    step = checkpoint.latest(warm)
    assert refrag_stage(out, ["debug=smoke", f"paths.outputs={out}", "run_name=rl"],
                        f"stage.source={step}").ctx.source_checkpoint == step
    with pytest.raises(UserError, match="neither a checkpoint step folder"):
        _ = refrag_stage(out, ["debug=smoke", f"paths.outputs={out}", "run_name=rl"],
                         f"stage.source={tmp_path}/nothing").ctx.source_checkpoint
    train(["debug=smoke", f"paths.outputs={out}", "run_name=rl"] + REFRAG +
          [f"stage.source={warm}", "stage.num_steps=1", "stage.rl_steps=1", "stage.group_size=2"], tmp_path / "rl")
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "rl/reward" in r] == [1]
    assert checkpoint.read_meta(checkpoint.latest(out / "checkpoints" / "rl" / "refrag"))["config"]["stage"][
        "source"] == str(warm)
    # the evaluator compares the RL run with the warm start it came from
    result = test_rag.cli("hybridchat.evaluate", f"paths.outputs={out}", "run_name=rl", "hops=2", "n_questions=4",
                          "bootstrap=20", f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 0, result.stderr[-3000:]
    names = [c["condition"] for c in json.loads((tmp_path / "eval" / "eval.json").read_text())["conditions"]]
    assert names[3:5] == ["REFRAG after warm start (p/refrag/step_000006)", "REFRAG after RL (model-written queries)"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_steps_run_under_torchrun(smoke_checkpoints, tmp_path, strategy):
    """Two gloo processes sample trajectories of different lengths per rank: under FSDP the rollouts
    must not run sharded forwards (ranks would wait on each other's all-gathers forever)."""
    import os
    import shutil
    import subprocess
    import sys

    out, _ = smoke_checkpoints
    shutil.copytree(out / "checkpoints" / "p" / "rag", tmp_path / "checkpoints" / "p" / "rag")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridchat.train",
         "debug=smoke", *REFRAG, "stage.num_steps=2", "stage.rl_steps=2", "stage.group_size=2", "stage.kl_coef=0.1",
         f"distributed.strategy={strategy}", f"paths.outputs={tmp_path}", f"paths.cache={out}/cache", "run_name=p"],
        cwd=test_rag.ROOT, capture_output=True, text=True, timeout=240,
        env={**{k: v for k, v in os.environ.items() if k != "HYBRIDCHAT_RUN_DIR"}, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-6000:]
    run_dir = next((tmp_path / "runs").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if "rl/reward" in r]
    assert [r["step"] for r in rl] == [1, 2]
    assert rl[0]["rl/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference: the whole policy at the first RL step
    assert checkpoint.latest(tmp_path / "checkpoints" / "p" / "refrag").name == "step_000002"


def evaluated(out, run_dir, *args) -> dict:
    """evaluate's eval.json for run p of `out` with args, written to run_dir."""
    result = test_rag.cli("hybridchat.evaluate", f"paths.outputs={out}", "run_name=p", *args, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "eval.json").read_text())


def test_evaluate_two_hop_conditions_on_world_and_on_your_questions(refrag_run, tmp_path):
    from hybridchat.data.world import World, WorldConfig

    out, _ = refrag_run
    report = evaluated(out, tmp_path / "eval", "hops=2", "n_questions=6", "n_unanswerable=4", "bootstrap=50")
    # the run ended with GRPO steps: its warm start's end is a condition of its own, before the end of RL
    assert [c["condition"] for c in report["conditions"]] == [
        "closed-book (mid model)", "RAG, bm25 top-3", "rule-based bridge queries",
        "REFRAG after warm start (step 4)", "REFRAG after RL (model-written queries)", "gold documents",
        "gold documents, own queries followed", "single-hop questions (model-written queries)"]
    closed, single, bridge, warm, refrag, gold, gold_queries, one_hop = report["conditions"]
    assert report["primary"] == 4 and warm["hops"][0] >= 1
    # 2-hop questions about made-up people: asked in every condition but the gold documents' (there are none)
    assert report["unanswerable"] == 4 and gold["unanswerable"] == 0
    assert all(c["unanswerable"] == 4 and {"abstain_unanswerable", "auroc"} <= set(c) for c in report["conditions"][:5])
    for c in report["conditions"]:
        assert c["answerable"] == 6 and {"em", "f1", "hallucination", "hops", "seconds"} <= set(c)
    # the checkpoint's single-hop questions (and 1-hop made-up people), answered with its own queries
    assert one_hop["unanswerable"] == 4 and 1 <= one_hop["hops"][0] <= 2
    asked = {json.loads(line)["question"]: json.loads(line)["condition"]
             for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()}
    world = World.generate(WorldConfig(**checkpoint.read_meta(checkpoint.latest(out / "checkpoints" / "p" / "refrag"))[
        "config"]["world"]))
    one_hop_questions = {q.question for q in world.questions("heldout", 1)}
    mine_asked = [q for q, c in asked.items() if c == one_hop["condition"]]
    assert len(mine_asked) == 10 and sum(q in one_hop_questions for q in mine_asked) == 6
    assert not one_hop_questions & {q for q, c in asked.items() if c == refrag["condition"]}
    # both gold documents at once, then the model's own queries followed: hop 1 shows the one-shot
    # condition's documents, as many as the first hop's room holds (the follow-ups' room is kept free:
    # at the smoke model's 512 tokens, one gold document of two at times), and a query the model writes
    # there is retrieved for instead of ending its reply
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    one_shot = {a["id"]: a for a in answers if a["condition"] == gold["condition"]}
    followed = [a for a in answers if a["condition"] == gold_queries["condition"]]
    assert len(followed) == 6
    for a in followed:
        shown, all_gold = a["hops"][0]["documents"], one_shot[a["id"]]["hops"][0]["documents"]
        assert shown and shown == all_gold[:len(shown)]
    # answered with room for a follow-up hop (this smoke model writes no query here: had it, one shot
    # would have ended the reply, here a retrieval follows)
    assert any(len(a["hops"][0]["documents"]) < len(one_shot[a["id"]]["hops"][0]["documents"]) for a in followed)
    assert "| single-hop questions (model-written queries) | " in (tmp_path / "eval" / "eval.md").read_text()
    assert closed["hops"][0] == 0 and single["hops"][0] == 1 and gold["all_gold_in_context"][0] == 1.0
    assert 1 <= refrag["hops"][0] <= 2 and 1 < bridge["hops"][0] <= 2
    # the bridge rule's second retrieval finds documents the question alone does not
    assert bridge["all_gold_in_context"][0] >= single["all_gold_in_context"][0]
    assert "| REFRAG after RL (model-written queries) | " in (tmp_path / "eval" / "eval.md").read_text()
    # your own 2-hop questions (two gold ids each): the same conditions, no single-hop ones of the world
    questions = tmp_path / "q2.jsonl"
    questions.write_text("".join(json.dumps({"question": q.question, "answers": list(q.answers),
                                             "gold_doc_ids": list(q.gold_doc_ids)}) + "\n"
                                 for q in world.questions("heldout", 2)[:4]))
    # ... asked of the rag checkpoint, chosen on the command line (checkpoint_stage, not `stage`: the group)
    ok = test_rag.cli("hybridchat.evaluate", f"paths.outputs={out}", "run_name=p", "checkpoint_stage=rag",
                      f"questions={questions}", "bootstrap=50", f"hydra.run.dir={tmp_path}/mine")
    assert ok.returncode == 0, ok.stderr[-3000:]
    mine = json.loads((tmp_path / "mine" / "eval.json").read_text())
    assert mine["hops"] == 2 and len(mine["conditions"]) == 6 and mine["answerable"] == 4 and mine["stage"] == "rag"
    assert mine["conditions"][mine["primary"]]["condition"] == "REFRAG (model-written queries)"


def test_chat_answers_with_the_runs_refrag_checkpoint_where_it_has_one(refrag_run, tmp_path):
    """The one checkpoint a user talks to: without checkpoint_stage, chat (and serve) open the run's
    refrag checkpoint where there is one, else its rag checkpoint; checkpoint_stage=rag still chooses."""
    from hybridchat.training.answering import default_stage

    out, _ = refrag_run
    assert default_stage(out / "checkpoints", "p") == "refrag"
    (tmp_path / "q" / "rag").mkdir(parents=True)
    (tmp_path / "q" / "refrag").mkdir()  # a stage folder without a checkpoint does not count
    assert default_stage(tmp_path, "q") == "rag"
    said = test_rag.cli("hybridchat.chat", f"paths.outputs={out}", "run_name=p", "prompt=Who founded Kor Industries?")
    assert said.returncode == 0, said.stderr[-2000:]
    assert f"{out}/checkpoints/p/refrag/step_" in said.stderr and "up to 2 hops" in said.stderr
    rag = test_rag.cli("hybridchat.chat", f"paths.outputs={out}", "run_name=p", "checkpoint_stage=rag",
                       "prompt=Who founded Kor Industries?")
    assert rag.returncode == 0 and f"{out}/checkpoints/p/rag/step_" in rag.stderr

def test_three_hop_evaluation_raises_max_hops_and_splits_the_follow_up_room_by_hand():
    """hops=3 asks one more retrieval than a 2-hop checkpoint was trained with: the two follow-ups
    share the room its one follow-up had (query + documents), so the first hop's documents keep theirs."""
    from types import SimpleNamespace

    from hybridchat.core.errors import UserError
    from hybridchat.evaluate import EvalConfig, hop_settings

    trained = SimpleNamespace(stage=SimpleNamespace(max_hops=2, hop_documents=2, max_query_tokens=16, hop_tokens=256))
    assert hop_settings(EvalConfig(hops=2), trained) == {"max_hops": 2, "hop_documents": 2, "max_query_tokens": 16,
                                                         "hop_tokens": 256}
    # one follow-up had 16 + 2 + 256 = 274 tokens; two get 137 each, 18 of them the query and its markers
    assert hop_settings(EvalConfig(hops=3), trained) == {"max_hops": 3, "hop_documents": 2, "max_query_tokens": 16,
                                                         "hop_tokens": 119}
    assert hop_settings(EvalConfig(hops=3, max_query_tokens=8), trained)["hop_tokens"] == 127
    assert hop_settings(EvalConfig(hops=3, hop_tokens=200), trained)["hop_tokens"] == 200  # as given
    assert hop_settings(EvalConfig(hops=3, max_hops=2), trained)["max_hops"] == 2
    tight = SimpleNamespace(stage=SimpleNamespace(max_hops=2, hop_documents=1, max_query_tokens=16, hop_tokens=10))
    with pytest.raises(UserError, match="hop_tokens="):
        hop_settings(EvalConfig(hops=3), tight)


def test_evaluate_three_hop_questions_no_stage_trained_on(refrag_run, tmp_path):
    from hybridchat.data.world import World, WorldConfig

    out, _ = refrag_run
    report = evaluated(out, tmp_path / "eval", "hops=3", "n_questions=4", "n_unanswerable=3", "bootstrap=20")
    # REFRAG's settings (stage.hop_tokens=160): two follow-ups in the room of one, (18 + 160) // 2 - 18 tokens each
    assert report["hops"] == 3 and report["multihop"]["max_hops"] == 3 and report["multihop"]["hop_tokens"] == 71
    names = [c["condition"] for c in report["conditions"]]
    assert names[-2:] == ["gold documents", "gold documents, own queries followed"]
    assert "single-hop questions (model-written queries)" not in names
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    gold = [a for a in answers if a["condition"] == "gold documents"]
    # all three gold documents, in hop order, as far as the smoke model's 512 tokens hold them
    world = World.generate(WorldConfig(n_people=60))
    hop_order = {q.id: list(q.gold_doc_ids) for q in world.questions("heldout", 3)}
    assert len(gold) == 4 and all(hop_order[a["id"]][:len(a["hops"][0]["documents"])] == a["hops"][0]["documents"]
                                  for a in gold)
    assert sum(len(a["hops"][0]["documents"]) == 3 for a in gold) >= 2
    refrag = [a for a in answers if a["condition"] == report["conditions"][report["primary"]]["condition"]]
    assert len(refrag) == 7 and all(len(a["hops"]) <= 3 for a in refrag)
    assert report["answerable"] == 4 and report["unanswerable"] == 3
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "4 3-hop held-out questions" in table and "| all 3 gold documents shown |" in table
    # malformed replies: each condition's share of replies whose queries or answer were not well-formed
    assert "| malformed replies |" in table and all(0 <= c["malformed"][0] <= 1 for c in report["conditions"])
    refused = test_rag.cli("hybridchat.evaluate", f"paths.outputs={out}", "run_name=p", "hops=4")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == "error: hops=4 must be 1, 2 or 3"

def test_refrag_chooses_its_abstention_threshold_on_2_hop_validation_questions(smoke_checkpoints, monkeypatch):
    """Answered multi-hop, as the refrag checkpoint answers 2-hop questions; never the held-out ones."""
    from test_abstention import plain_search

    test_rag.spread_confidence(monkeypatch)
    out, common = smoke_checkpoints
    stage = refrag_stage(out, common, "stage.target_false_abstention=0.5")
    model = load_run(checkpoint.latest(out / "checkpoints" / "p" / "rag")).model
    metrics = stage.evaluate(model)
    found = stage.checkpoint_meta()["abstention"]
    validation = stage.val_hops[:6]  # stage.eval_questions=6
    assert not {q.question for q in validation} & {q.question for q in stage.heldout_hops}
    hits = stage.ctx.retriever.search([q.question for q in validation], top_k=3)
    answers = stage.multihop(model, None).answer([q.question for q in validation],
                                                 [[h.document for h in row] for row in hits])
    assert (found["questions"], found["unanswerable"]) == (6, 0) and "refrag" in found["chosen_on"]
    assert found["threshold"] == metrics["val/abstain_threshold"] == plain_search([a.confidence for a in answers], 0.5)


def test_a_grpo_step_samples_groups_scores_them_and_reports_rewards(smoke_checkpoints):
    out, common = smoke_checkpoints
    stage = refrag_stage(out, common, "stage.rl_steps=6", "stage.group_size=2", "stage.reward_format=1.0",
                         "stage.hop_cost=0.25", "stage.kl_coef=0.5")
    model = load_run(checkpoint.latest(out / "checkpoints" / "p" / "rag")).model
    stage.ctx.model = model.train()
    batch = next(stage.train_batches(0, 0, 1))  # rl_steps == num_steps: RL from the first batch
    assert "targets" not in batch and len(batch["inputs"]) == 2  # micro_batch 4 // group_size 2 questions
    # RL asks the warm start's mix: every 2-hop training question, then single-hop ones at stage.single_hop
    hops, singles = stage.rl_questions[:len(stage.train_hops)], stage.rl_questions[len(stage.train_hops):]
    assert hops == stage.train_hops and len(singles) == stage.n_single > 0
    assert all(len(q.gold_doc_ids) <= 1 for q in singles)
    picked = {i for b in islice(stage.train_batches(0, 0, 1), 40) for i in b["inputs"].tolist()}
    assert any(i >= len(stage.train_hops) for i in picked) and any(i < len(stage.train_hops) for i in picked)
    questions = [stage.rl_questions[i] for i in batch["inputs"].tolist()]
    trajectories = stage.grpo.rollouts(questions, seed=0)
    assert [t.index for t in trajectories] == [0, 0, 1, 1]
    rewards, terms = stage.grpo.rewards(questions, trajectories)
    # reward = em + format - 0.25 x follow-up retrievals, from the trajectories themselves
    answers = [stage.planner.to_answer(questions[t.index].question, t) for t in trajectories]
    hand = [float(a.format_ok) + (not a.abstained and exact_match(a.answer, questions[t.index].answers)
                                  if questions[t.index].answers else a.abstained)
            - 0.25 * (a.n_hops - 1) for a, t in zip(answers, trajectories)]
    assert rewards.view(-1).tolist() == pytest.approx(hand)
    loss = stage.training_step(model, batch)
    loss.backward()
    # tok/s counts the trajectories the policy loss ran over, not the batch of question indices
    from hybridchat.training.stages.refrag.grpo import policy_batch

    assert stage.batch_tokens(batch) == policy_batch(trajectories, stage.renderer.pad_id)["inputs"].numel() > 100
    metrics = stage.step_metrics()
    assert {"rl/reward", "rl/em", "rl/f1", "rl/gold", "rl/format", "rl/hops", "rl/accuracy", "rl/kl"} <= set(metrics)
    assert metrics["rl/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy at the first RL step
    assert 1.0 <= metrics["rl/hops"] <= 2.0 and stage.step_metrics() == {}
    assert torch.isfinite(loss)


def test_under_compile_warm_start_and_policy_batches_come_in_padded_widths(smoke_checkpoints):
    """gpu.compile=true: the warm start's traces and GRPO's trajectories, like mid's and rag's
    conversations, are padded to powers of two up to model.sequence_len (512 here)."""
    out, common = smoke_checkpoints
    exact, padded = refrag_stage(out, common), refrag_stage(out, common, "gpu.compile=true")
    widths = [(e["inputs"].shape[1], p["inputs"].shape[1])
              for e, p in zip(islice(exact.train_batches(0, 0, 1), 4), islice(padded.train_batches(0, 0, 1), 4))]
    assert all(p == min(1 << (e - 1).bit_length(), 512) for e, p in widths) and any(e != p for e, p in widths)
    stage = refrag_stage(out, common, "gpu.compile=true", "stage.rl_steps=6", "stage.group_size=2")
    stage.ctx.model = load_run(checkpoint.latest(out / "checkpoints" / "p" / "rag")).model.train()
    batch = next(stage.train_batches(0, 0, 1))
    stage.training_step(stage.ctx.model, batch)
    width = stage.batch_tokens(batch) // 4  # 2 questions x group_size 2 trajectories
    assert width in (64, 128, 256, 512), width


def test_chat_prints_the_hop_trace():
    import io

    from hybridchat.chat import answer_multihop

    tok = tokenizer()
    model = Scripted(tok.vocab_size, script_query_then_answer(tok, "Kor Industries", "[2] Tam Brel"))
    printed = io.StringIO()
    answer_multihop(QUESTION, multihop(model, tok, TitleRetriever()), out=printed)
    lines = printed.getvalue().splitlines()
    assert lines[0] == "sources:" and lines[1].startswith("  [1] Ada Vell (person-0001): ")
    assert lines[2] == "query 1: Kor Industries" and lines[3].startswith("  [2] Kor Industries (company-0002): ")
    assert lines[4] == "answer: [2] Tam Brel" and lines[5] == "cited: [2] Kor Industries (company-0002)"
    assert lines[6].startswith("confidence: ")


# -- rewards, advantages, the policy loss ---------------------------------------------------------


def _answer(reply, documents, hops=2, format_ok=True):
    from hybridchat.rag.answer import Answer, parse_reply

    answer, cited, abstained = parse_reply(reply)
    trace = [Hop(QUESTION, documents[:1])] + [Hop(f"q{i}", documents[1:] if i == 1 else [],
                                                  "ok" if i == 1 else "over_max_hops") for i in range(1, hops)]
    return Answer(QUESTION, reply, answer, cited, abstained, 0.5, list(documents), hops=trace, format_ok=format_ok)


def test_reward_terms_on_hand_made_trajectories():
    from hybridchat.training.stages.refrag.grpo import reward_terms

    gold = ("person-0001", "company-0002")
    right = reward_terms(_answer("[2] Tam Brel", [ADA, KOR]), ["Tam Brel"], gold)
    assert right == {"em": 1.0, "f1": 1.0, "gold": 1.0, "format": 1.0, "hops": 1.0}
    partial = reward_terms(_answer("[1] Tam", [ADA], hops=1), ["Tam Brel"], gold)
    assert partial == {"em": 0.0, "f1": pytest.approx(2 / 3), "gold": 0.5, "format": 1.0, "hops": 0.0}
    broken = reward_terms(_answer("The documents do not say.", [ADA, VELLPORT], hops=3, format_ok=False),
                          ["Tam Brel"], gold)
    assert broken == {"em": 0.0, "f1": 0.0, "gold": 0.5, "format": 0.0, "hops": 1.0}  # a refused hop is no retrieval
    # a question no document answers: abstaining is the right answer, answering is not
    abstained = reward_terms(_answer("The documents do not say.", [ADA], hops=1), [], ())
    assert abstained == {"em": 1.0, "f1": 1.0, "gold": 0.0, "format": 1.0, "hops": 0.0}
    answered = reward_terms(_answer("[1] Vellport", [ADA], hops=1), [], ())
    assert answered == {"em": 0.0, "f1": 0.0, "gold": 0.0, "format": 1.0, "hops": 0.0}


def test_the_reward_weighs_its_terms_and_charges_each_hop():
    from hybridchat.training.stages.refrag import RefragConfig
    from hybridchat.training.stages.refrag.grpo import reward_weights, total_reward

    weights = reward_weights(RefragConfig(reward_em=1.0, reward_f1=0.5, reward_gold=0.25, reward_format=0.1,
                                          hop_cost=0.2))
    terms = {"em": 1.0, "f1": 0.5, "gold": 0.5, "format": 1.0, "hops": 2.0}
    assert total_reward(terms, weights) == pytest.approx(1.0 + 0.25 + 0.125 + 0.1 - 0.4)


def test_group_advantages_on_a_hand_made_group():
    from hybridchat.training.stages.refrag.grpo import group_advantages

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
    # group 1: mean 0.5, population std 0.5; group 2: all equal -> 0; group 3: mean 1, std sqrt(0.5)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0],
                             [2 ** 0.5, -(2 ** 0.5), 0.0, 0.0]])
    assert torch.allclose(group_advantages(rewards), expected, atol=1e-4)


def test_the_policy_loss_counts_only_written_tokens_and_matches_a_hand_sum():
    from hybridchat.rag.multihop import Trajectory
    from hybridchat.training.stages.refrag.grpo import grpo_loss, policy_batch, token_logprobs

    tok = tokenizer()
    model = tiny_lm(tok.vocab_size)
    t1 = Trajectory(0, [1, 2, 3], [4, 5, 6, 7, 8], [1, 0, 0, 1, 1], [], "stop", 3)
    t2 = Trajectory(0, [1, 2], [9, 10], [1, 1], [], "stop", 0)
    batch = policy_batch([t1, t2], pad_id=0)
    # targets: the prompt, the injected tokens (5, 6) and the padding carry none
    assert batch["targets"].tolist() == [[-1, -1, 4, -1, -1, 7, 8], [-1, 9, 10, -1, -1, -1, -1]]
    advantages = torch.tensor([1.0, -2.0])
    logprobs = token_logprobs(model, batch)
    loss, _ = grpo_loss(logprobs, advantages, (batch["targets"] >= 0).float())
    full = model(batch["inputs"]).log_softmax(-1)
    hand = -(1.0 * (full[0, 2, 4] + full[0, 5, 7] + full[0, 6, 8]) - 2.0 * (full[1, 1, 9] + full[1, 2, 10])) / 5
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    mask = (batch["targets"] >= 0).float()
    _, kl = grpo_loss(logprobs.detach(), advantages, mask, logprobs.detach(), 0.5)
    assert kl == pytest.approx(0.0, abs=1e-7)
    # k3 with the reference 0.1 nats below on every written token: exp(-0.1) + 0.1 - 1, weighted by kl_coef
    with_kl, kl = grpo_loss(logprobs.detach(), advantages, mask, logprobs.detach() - 0.1, 0.5)
    assert kl == pytest.approx(math.exp(-0.1) + 0.1 - 1, rel=1e-4)
    assert with_kl.item() == pytest.approx(hand.item() + 0.5 * kl, rel=1e-5)


def test_two_hop_evaluation_asks_two_hop_questions_about_made_up_people_too():
    from hybridchat.data.world import World, WorldConfig
    from hybridchat.evaluate import multi_hop_questions

    world = World.generate(WorldConfig(n_people=60))
    items = multi_hop_questions(world, 2, 5, 7, seed=0)
    answerable, made_up = items[:5], items[5:]
    assert all(len(i.gold_doc_ids) == 2 and i.answers for i in answerable)
    hops = {q.question: q.hops for q in world.unanswerable_questions(world.unanswerable_capacity())}
    assert len(made_up) == 7 and all(not i.answers and not i.gold_doc_ids and hops[i.question] == 2 for i in made_up)


def test_the_warm_start_settles_before_grpo_runs_at_its_own_constant_rate():
    from types import SimpleNamespace

    from hybridchat.training.stages.refrag import RefragConfig, RefragStage

    c = RefragConfig(num_steps=10, rl_steps=4, warmup_steps=2, warmdown_ratio=0.5, final_lr_frac=0.1, rl_lr_frac=0.2)
    rates = [RefragStage.lr_multiplier(SimpleNamespace(config=c), step) for step in range(10)]
    # warm start (6 steps): warmup over 2, then a warmdown over its last 3 that ends near final_lr_frac
    assert rates == pytest.approx([0.5, 1, 1, 1, 2 / 3 + 0.1 / 3, 1 / 3 + 0.2 / 3, 0.2, 0.2, 0.2, 0.2])
