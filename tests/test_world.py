import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question
from hybridchat.data.world import PHRASINGS, World, WorldConfig, _template_words


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(WorldConfig())


def _all_questions(world: World) -> list[Question]:
    return [q for s in ("train", "heldout") for hops in (1, 2) for q in world.questions(s, hops)]


def _names_pattern(names: list[str]) -> re.Pattern:
    # Word boundaries: "Ana Tor" must not match inside "Ana Torvik".
    return re.compile(r"\b(?:" + "|".join(map(re.escape, names)) + r")\b")


def _digest(world: World) -> str:
    payload = {
        "docs": [[d.id, d.title, d.text, dict(d.metadata), d.source] for d in world.documents()],
        "texts": [world.pretraining_texts(s) for s in ("train", "val")],
        "questions": [q.to_json() for q in _all_questions(world)],
        "chats": [world.conversations(s) for s in ("train", "heldout")],
        "unanswerable": [q.to_json() for q in world.unanswerable_questions(50)],
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_world_and_other_seed_differs(world):
    assert _digest(World.generate(WorldConfig())) == _digest(world)
    other = World.generate(WorldConfig(seed=1))
    assert [d.text for d in other.documents()] != [d.text for d in world.documents()]
    assert other.pretraining_texts("train") != world.pretraining_texts("train")


def test_output_does_not_depend_on_hash_seed():
    code = (
        "import sys; sys.path.insert(0, '.'); from tests.test_world import _digest; "
        "from hybridchat.data.world import World, WorldConfig; "
        "print(_digest(World.generate(WorldConfig(n_people=200, n_companies=20))))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                                capture_output=True, text=True, check=True)
        digests.add(result.stdout.strip())
    assert len(digests) == 1


# ------------------------------------------------------------------------------------------------
# Held-out isolation


def test_heldout_people_never_appear_in_training_text(world):
    heldout = [e.name for e in world.entities if e.split == "heldout"]
    assert len(heldout) == 200
    pattern = _names_pattern(heldout)
    heldout_docs = [d for d in world.documents() if d.metadata["split"] == "heldout"]
    assert len(heldout_docs) == 200
    # The pattern does find them where they belong, so a miss below is meaningful.
    assert all(pattern.search(d.text) for d in heldout_docs)
    assert all(pattern.search(q.question) for q in world.questions("heldout", 1))

    train_text = "\n".join(world.pretraining_texts("train") + world.pretraining_texts("val"))
    train_questions = "\n".join(q.question for h in (1, 2) for q in world.questions("train", h))
    train_chats = "\n".join(t["content"] for c in world.conversations("train") for t in c)
    for text in (train_text, train_questions, train_chats):
        match = pattern.search(text)
        assert match is None, f"held-out person {match.group(0)!r} leaked into training text"
    # Every non-person document is training knowledge too, so it must not name them either.
    other_docs = "\n".join(d.text for d in world.documents() if d.metadata["type"] != "person")
    assert pattern.search(other_docs) is None


def test_split_membership(world):
    split_of = {d.id: d.metadata["split"] for d in world.documents()}
    for q in _all_questions(world):
        assert split_of[q.gold_doc_ids[0]] == q.split
    heldout = _names_pattern([e.name for e in world.entities if e.split == "heldout"])
    assert all(heldout.search(chat[0]["content"]) for chat in world.conversations("heldout"))
    heldout_kinds = {d.metadata["type"] for d in world.documents() if d.metadata["split"] == "heldout"}
    assert heldout_kinds == {"person"}


# ------------------------------------------------------------------------------------------------
# Questions and documents


def test_every_answer_is_in_its_last_gold_doc(world):
    docs = {d.id: d for d in world.documents()}
    questions = _all_questions(world)
    assert {(q.split, q.hops) for q in questions} == {(s, h) for s in ("train", "heldout")
                                                      for h in (1, 2)}
    for q in questions:
        assert len(q.gold_doc_ids) == q.hops
        assert q.answers and all(a for a in q.answers)
        first, last = docs[q.gold_doc_ids[0]], docs[q.gold_doc_ids[-1]]
        assert first.title in q.question, q
        for answer in q.answers:
            assert answer in last.text, q
        if q.hops == 2:
            # The bridge entity is named in the first document, so a reader can make the hop.
            assert last.title in first.text, q
            assert last.id != first.id


def test_questions_cover_several_relations_and_phrasings(world):
    for split in ("train", "heldout"):
        for hops in (1, 2):
            questions = world.questions(split, hops)
            relations = {q.id.split("/")[1] for q in questions}
            assert len(relations) >= 4, (split, hops, relations)
            openings = {" ".join(q.question.split()[:2]) for q in questions}
            assert len(openings) >= 6, (split, hops, openings)
    json_q = world.questions("heldout", 2)[0].to_json()
    assert set(json_q) == {"id", "question", "answers", "gold_doc_ids", "hops", "split"}
    assert isinstance(json_q["answers"], list) and isinstance(json_q["gold_doc_ids"], list)
    json.dumps(json_q)


def test_documents_state_every_fact(world):
    docs = {d.id: d for d in world.documents()}
    for e in world.entities:
        doc = docs[e.id]
        assert doc.title == e.name and doc.source == "synthetic-world"
        assert doc.metadata == {"type": e.kind, "split": e.split}
        for value in e.facts.values():
            assert value in doc.text, (e.id, value)


def test_unique_ids_and_names(world):
    docs = world.documents()
    assert len({d.id for d in docs}) == len(docs)
    assert len({d.title for d in docs}) == len(docs)
    assert all(re.fullmatch(r"(person|city|country|company|university)-\d{4}", d.id) for d in docs)
    ids = [q.id for q in _all_questions(world)]
    assert len(set(ids)) == len(ids)


def test_relations_are_consistent(world):
    for e in world.entities:
        # A relation's name in the text is the linked entity's name.
        for attribute, target in e.links.items():
            assert e.facts[attribute] == world.entity(target).name
    for country in (e for e in world.entities if e.kind == "country"):
        capital = world.entity(country.links["capital"])
        assert capital.links["country"] == country.id
        assert capital.facts["capital_of"] == country.name
        members = [e for e in world.entities
                   if e.kind == "city" and e.links["country"] == country.id]
        assert members and all(m.name in country.facts["cities"] for m in members)
        assert sum("capital_of" in m.facts for m in members) == 1
    for company in (e for e in world.entities if e.kind == "company"):
        founder = world.entity(company.links["founder"])
        assert founder.split == "train"
        assert int(company.facts["founded"]) >= int(founder.facts["birth_year"]) + 20
    for uni in (e for e in world.entities if e.kind == "university"):
        assert int(uni.facts["founded"]) > int(world.entity(uni.links["city"]).facts["founded"])
    for person in (e for e in world.entities if e.kind == "person"):
        born = int(person.facts["birth_year"])
        assert person.facts["birth_date"].endswith(f", {born}")
        employer = world.entity(person.links["employer"])
        university = world.entity(person.links["university"])
        assert int(person.facts["joined"]) >= max(born + 18, int(employer.facts["founded"]))
        assert int(person.facts["graduated"]) > int(university.facts["founded"])
        assert int(person.facts["joined"]) <= 2024 and int(person.facts["graduated"]) <= 2024


def test_three_hop_questions_chain_three_documents_and_no_stage_sees_them(world):
    """evaluate hops=3's questions: each hop's document names the next one's entity, the answer is in
    the third, and neither the questions nor their phrasings are in anything a stage trains on."""
    docs = {d.id: d for d in world.documents()}
    questions = world.questions("heldout", 3)
    assert len({q.id.split("/")[1] for q in questions}) == 6 and world.questions("heldout", 3) == questions
    for q in questions:
        assert q.hops == 3 and len(set(q.gold_doc_ids)) == 3 and q.answers, q
        first, second, third = (docs[g] for g in q.gold_doc_ids)
        assert first.title in q.question and first.metadata["split"] == "heldout"
        assert second.title in first.text and third.title in second.text, q
        assert third.title not in q.question and all(a in third.text for a in q.answers), q
    trained = {q.question for q in _all_questions(world)}
    trained |= {turn["content"] for split in ("train", "heldout") for chat in world.conversations(split) for turn in chat}
    trained |= {q.question for q in world.unanswerable_questions(world.unanswerable_capacity())}
    texts = "\n".join(world.pretraining_texts("train"))
    for q in questions[:50] + world.questions("train", 3)[:50]:
        assert q.question not in trained and q.question not in texts, q
    # their words are the fixed vocabulary's already: adding them renamed no entity
    words = {w.lower() for q in questions for w in re.findall(r"[A-Za-z]+", q.question.replace(q.gold_doc_ids and
                                                                                            docs[q.gold_doc_ids[0]].title, ""))}
    assert words <= _template_words()


def test_three_hop_made_up_people_are_the_evaluations_own(world):
    """The 3-hop questions about made-up people ask about the held-out fifth, never a name the rag
    stage's unanswerable questions (the other four fifths) train on."""
    n = 40
    three = world.unanswerable_three_hop(n)
    assert len(three) == n and all(q.hops == 3 and not q.answers and not q.gold_doc_ids for q in three)
    first_names = {e.name.split()[0] for e in world.entities if e.kind == "person"}

    def made_up(q: Question) -> str:
        (found,) = [m for m in re.findall(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", q.question) if m.split()[0] in first_names]
        return found
    heldout_names = [made_up(q) for q in world.unanswerable_split("heldout", n)]
    assert [made_up(q) for q in three] == heldout_names
    train_text = "\n".join(q.question for q in world.unanswerable_split("train", 4 * n))
    assert not any(n_ in train_text for n_ in heldout_names)
    assert world.unanswerable_three_hop(n) == three


# ------------------------------------------------------------------------------------------------
# Unanswerable questions


def test_unanswerable_people_do_not_exist(world):
    questions = world.unanswerable_questions(300)
    assert len(questions) == 300 and len({q.id for q in questions}) == 300
    assert questions == world.unanswerable_questions(300)
    first_names = {e.name.split()[0] for e in world.entities if e.kind == "person"}
    all_docs = "\n".join(d.text for d in world.documents())
    fake = []
    for q in questions:
        assert q.answers == () and q.gold_doc_ids == () and q.split == "unanswerable"
        assert q.hops in (1, 2)
        pairs = re.findall(r"\b([A-Z][a-z]+ [A-Z][a-z]+)\b", q.question)
        names = [m for m in pairs if m.split()[0] in first_names]
        assert len(names) == 1, q.question
        fake.append(names[0])
    assert len(set(fake)) == len(fake)
    assert _names_pattern(fake).search(all_docs) is None
    assert not set(fake) & {d.title for d in world.documents()}


def test_unanswerable_count_is_validated(world):
    assert world.unanswerable_questions(0) == []
    with pytest.raises(UserError, match="unanswerable"):
        world.unanswerable_questions(-1)
    with pytest.raises(UserError, match="unanswerable"):
        world.unanswerable_questions(10**9)


# ------------------------------------------------------------------------------------------------
# Texts and conversations


def test_default_sizes(world):
    docs = world.documents()
    assert len(docs) == 1000 + 60 + 12 + 120 + 30
    n_train_entities = sum(d.metadata["split"] == "train" for d in docs)
    train, val = world.pretraining_texts("train"), world.pretraining_texts("val")
    # six renderings per entity and 4000 reading-practice texts: the world every run trains on
    assert len(train) == 6 * n_train_entities + 4000 and len(val) == n_train_entities
    size = sum(len(t.encode()) for t in train)
    assert 4e6 < size < 8e6, size
    assert len(world.questions("heldout", 1)) == 200 * 11
    assert all(t.isascii() for t in train + val + [d.text for d in docs])


def test_renderings_differ(world):
    train, val = world.pretraining_texts("train"), world.pretraining_texts("val")
    assert len(set(train)) == len(train)
    assert not set(train) & set(val)
    # Rendering k uses phrasing offset + k of each slot: with the most texts per entity, the
    # sentences of one person's training and validation texts are still pairwise distinct.
    w = World.generate(WorldConfig(n_people=20, texts_per_entity=PHRASINGS - 1, questions_per_text=0,
                                   practice_texts=0))
    person = next(e for e in w.entities if e.kind == "person" and e.split == "train")
    texts = [t for split in ("train", "val") for t in w.pretraining_texts(split) if person.facts["birth_date"] in t]
    sentences = [s for t in texts for s in re.split(r"(?<=\.) ", t)]
    assert len(texts) == PHRASINGS and len(set(sentences)) == len(sentences)


def test_conversations_are_well_formed(world):
    for split, count in (("train", 800 + 60 + 12 + 120 + 30), ("heldout", 200)):
        chats = world.conversations(split)
        assert len(chats) == count
        for chat in chats:
            assert 2 <= len(chat) <= 6 and len(chat) % 2 == 0
            assert [t["role"] for t in chat] == ["user", "assistant"] * (len(chat) // 2)
            assert all(t["content"].endswith("?") for t in chat[0::2])
        # One chat per entity of the split, in entity order; each reply is a fact of the entity
        # or of an entity it links to (2-hop).
        for e, chat in zip([e for e in world.entities if e.split == split], chats):
            linked = [world.entity(t) for t in e.links.values()]
            known = set(e.facts.values()) | {v for x in linked for v in x.facts.values()}
            for question, reply in zip(chat[0::2], chat[1::2]):
                assert e.name in question["content"]
                assert reply["content"] in known, reply


def test_tiny_world():
    w = World.generate(WorldConfig(n_people=1, n_cities=1, n_countries=1, n_companies=1,
                                   n_universities=1))
    assert len(w.documents()) == 5
    assert w.questions("heldout", 1) == [] and w.questions("train", 2)
    with pytest.raises(UserError, match="unanswerable"):
        w.unanswerable_questions(1)


# ------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_people": 0}, "n_people"),
        ({"n_people": -3}, "n_people"),
        ({"n_people": 2.5}, "n_people"),
        ({"n_cities": 0}, "n_cities"),
        ({"n_countries": 30, "n_cities": 10}, "n_cities"),
        ({"n_companies": 0}, "n_companies"),
        ({"n_universities": 0}, "n_universities"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"heldout_fraction": -0.1}, "heldout_fraction"),
        ({"heldout_fraction": float("nan")}, "heldout_fraction"),
        ({"texts_per_entity": 0}, "texts_per_entity"),
        ({"texts_per_entity": PHRASINGS + 1}, "texts_per_entity"),
        ({"seed": "zero"}, "seed"),
    ],
)
def test_bad_config_names_field_and_range(kwargs, field):
    with pytest.raises(UserError, match=field) as info:
        WorldConfig(**kwargs)
    message = str(info.value)
    assert field == "seed" or re.search(r"\[|>=", message), message


def test_bad_arguments(world):
    with pytest.raises(UserError, match="split"):
        world.pretraining_texts("heldout")
    with pytest.raises(UserError, match="split"):
        world.questions("val", 1)
    with pytest.raises(UserError, match="hops"):
        world.questions("train", 4)
    with pytest.raises(UserError, match="split"):
        world.conversations("test")


def test_reading_practice_texts_state_their_answers_about_people_who_exist_nowhere():
    w = World.generate(WorldConfig(n_people=200, n_companies=20, questions_per_text=3, practice_texts=50))
    base = World.generate(WorldConfig(n_people=200, n_companies=20, questions_per_text=3, practice_texts=0))
    practice = sorted(set(w.pretraining_texts("train")) - set(base.pretraining_texts("train")))
    assert len(practice) == 50 and w.pretraining_texts("val") == base.pretraining_texts("val")
    world_words = {word for e in w.entities for word in e.name.split()}
    made_up = {word for q in w.unanswerable_questions(100) for word in re.findall(r"[A-Z][a-z]+", q.question)}
    for text in practice:
        body, *qa = text.split(" Question: ")
        assert len(qa) == 3
        for pair in qa:
            question, answer = pair.split(" Answer: ")
            assert answer.rstrip(".") in body  # the text states every answer: reading finds it
        pairs = re.findall(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", body)
        name = max(set(pairs), key=pairs.count)  # the person: named in every sentence
        assert pairs.count(name) >= 5 and all(name in pair for pair in qa)
        # a fresh name: neither a world entity's words nor an unanswerable question's made-up person
        assert not set(name.split()) & (world_words | made_up), name
