"""Standard QA datasets (SQuAD v1.1/v2.0, HotpotQA, 2Wiki, FlashRAG, NQ-open) read as documents and
questions: hand-written files in each format, the records they give, one error line per bad record
naming where it is, detection, streaming, and the files `convert` writes for kb build and evaluate."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re

import pytest
from conftest import command_result

from hybridchat.core import fsutil
from hybridchat.core.errors import UserError
from hybridchat.core.questions import read_questions
from hybridchat.data import qa_formats
from hybridchat.data.qa_formats import convert, detect_format, read_dataset

NORMANS = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."
ROLLO = "Rollo was the Viking leader who founded Normandy in 911."
EMPTY_SKY = "The sky over Normandy is often grey."

SQUAD_V1 = {"data": [{"title": "Normans", "paragraphs": [
    {"context": NORMANS, "qas": [
        {"id": "s1", "question": "In what country is Normandy located?",
         "answers": [{"text": "France", "answer_start": 0}, {"text": " France ", "answer_start": 0},
                     {"text": "the Kingdom of France", "answer_start": 0}, {"text": "France", "answer_start": 3}]}]},
    {"context": ROLLO, "qas": [
        {"id": "s2", "question": "Who founded Normandy?", "answers": [{"text": "Rollo", "answer_start": 0}]},
        {"id": 17, "question": "When was Normandy founded?", "answers": [{"text": "911", "answer_start": 52}]}]}]}],
    "version": "1.1"}

SQUAD_V2 = {"version": "v2.0", "data": [
    {"title": "Normans", "paragraphs": [
        {"context": ROLLO, "qas": [
            {"id": "u1", "question": "Who founded Normandy?", "answers": [{"text": "Rollo", "answer_start": 0}],
             "is_impossible": False},
            {"id": "u2", "question": "Who founded Rollo?", "answers": [],
             "plausible_answers": [{"text": "Viking", "answer_start": 16}], "is_impossible": True}]}]},
    {"title": "Weather", "paragraphs": [
        # the same paragraph as the first article's, under its own title: another document
        {"context": ROLLO, "qas": []},
        {"context": EMPTY_SKY, "qas": [
            {"id": "u3", "question": "What colour is the sea?", "answers": [], "is_impossible": True}]}]}]}

# HotpotQA's sentences carry their leading space; a distractor, a paragraph two examples share
HOTPOT = [
    {"_id": "h1", "question": "Were Scott Derrickson and Ed Wood of the same nationality?", "answer": "yes",
     "type": "comparison", "level": "hard",
     "context": [["Ed Wood", ["Edward Davis Wood Jr. was an American filmmaker.", " He made cult films."]],
                 ["Scott Derrickson", ["Scott Derrickson is an American director.", " He lives in Los Angeles."]],
                 ["Doctor Strange", ["Doctor Strange is a 2016 film."]]],
     "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0], ["Scott Derrickson", 1]]},
    {"_id": "h2", "question": "Who directed Doctor Strange?", "answer": " Scott Derrickson ",
     "type": "bridge", "level": "easy",
     "context": [["Doctor Strange", ["Doctor Strange is a 2016 film."]],
                 ["Scott Derrickson", ["Scott Derrickson is an American director.", " He lives in Los Angeles."]],
                 ["Empty", []]],
     "supporting_facts": [["Doctor Strange", 0], ["Scott Derrickson", 0], ["Doctor Strange", 0]]},
]

# 2Wiki's sentences come without the space between them; three supporting paragraphs
TWO_WIKI = [
    {"_id": "w1", "type": "bridge_comparison",
     "question": "Which film has the director born first, Move or Blind Shaft?",
     "context": [["Move (1970 film)", ["Move is a 1970 American comedy film.", "It stars Elliott Gould."]],
                 ["Stuart Rosenberg", ["Stuart Rosenberg was born in 1927."]],
                 ["Blind Shaft", ["Blind Shaft is a 2003 film.", "It was directed by Li Yang."]],
                 ["Li Yang", ["Li Yang was born in 1959."]]],
     "supporting_facts": [["Move (1970 film)", 0], ["Blind Shaft", 1], ["Stuart Rosenberg", 0],
                          ["Li Yang", 0], ["Move (1970 film)", 1]],
     "evidences": [["Move", "director", "Stuart Rosenberg"], ["Blind Shaft", "director", "Li Yang"]],
     "answer": "Move"},
]

FLASHRAG = [{"id": "test_0", "question": "who got the first nobel prize in physics", "golden_answers":
             ["Wilhelm Conrad Röntgen", "Röntgen", "Röntgen"], "metadata": {"source": "nq"}},
            {"id": 7, "question": "how many planets are there", "golden_answers": [8]},
            {"id": "test_2", "question": "what is the answer to nothing", "golden_answers": []}]

NQ = [{"question": "where is the eiffel tower", "answer": ["Paris", "Paris, France"]},
      {"question": "who wrote hamlet", "answer": ["William Shakespeare"]}]


def write_json(path, obj, indent=None):
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def by_text(documents):
    return {(d.title, d.text): d for d in documents}


def error_of(path, format="auto") -> str:
    with pytest.raises(UserError) as e:
        read_dataset(path, format)
    assert "\n" not in str(e.value)
    return str(e.value)


# Records ---------------------------------------------------------------------------------------------


def test_squad_v1_paragraphs_are_documents_and_questions_keep_every_answer_once(tmp_path):
    path = write_json(tmp_path / "train-v1.1.json", SQUAD_V1)  # one line, 'data' before 'version', like the original
    docs, questions = read_dataset(path)
    assert [(d.title, d.text, d.source) for d in docs] == [("Normans", NORMANS, str(path)), ("Normans", ROLLO, str(path))]
    assert len({d.id for d in docs}) == 2 and all(d.id.startswith("Normans/") for d in docs)
    normans, rollo = docs
    assert [(q.id, q.question, q.answers, q.gold_doc_ids, q.hops) for q in questions] == [
        ("s1", "In what country is Normandy located?", ("France", "the Kingdom of France"), (normans.id,), 1),
        ("s2", "Who founded Normandy?", ("Rollo",), (rollo.id,), 1),
        ("17", "When was Normandy founded?", ("911",), (rollo.id,), 1)]


def test_squad_v2_impossible_questions_have_no_answers_and_no_gold_document(tmp_path):
    docs, questions = read_dataset(write_json(tmp_path / "dev-v2.0.json", SQUAD_V2, indent=2))
    docs = by_text(docs)
    assert set(docs) == {("Normans", ROLLO), ("Weather", ROLLO), ("Weather", EMPTY_SKY)}
    assert [(q.id, q.answers, q.gold_doc_ids) for q in questions] == [
        ("u1", ("Rollo",), (docs["Normans", ROLLO].id,)), ("u2", (), ()), ("u3", (), ())]


def test_hotpotqa_gold_paragraphs_in_hop_order_and_shared_paragraphs_are_one_document(tmp_path):
    path = write_json(tmp_path / "hotpot_dev_distractor_v1.json", HOTPOT)
    docs, questions = read_dataset(path)
    assert [(d.title, d.text) for d in docs] == [
        ("Ed Wood", "Edward Davis Wood Jr. was an American filmmaker. He made cult films."),
        ("Scott Derrickson", "Scott Derrickson is an American director. He lives in Los Angeles."),
        ("Doctor Strange", "Doctor Strange is a 2016 film.")]  # "Empty" has no text: nothing to retrieve
    ed, scott, strange = (d.id for d in docs)
    assert [(q.id, q.answers, q.gold_doc_ids, q.hops) for q in questions] == [
        ("h1", ("yes",), (scott, ed), 2),  # supporting facts name Scott Derrickson first
        ("h2", ("Scott Derrickson",), (strange, scott), 2)]


def test_2wiki_sentences_are_joined_with_a_space_and_hops_count_distinct_supporting_titles(tmp_path):
    docs, questions = read_dataset(write_json(tmp_path / "dev.json", TWO_WIKI))
    texts = {d.id: d.text for d in docs}
    (q,) = questions
    assert [texts[i] for i in q.gold_doc_ids] == [
        "Move is a 1970 American comedy film. It stars Elliott Gould.",
        "Blind Shaft is a 2003 film. It was directed by Li Yang.",
        "Stuart Rosenberg was born in 1927.", "Li Yang was born in 1959."]
    assert (q.id, q.answers, q.hops) == ("w1", ("Move",), 4)


def test_a_paragraph_has_the_same_id_in_every_file_it_appears_in(tmp_path):
    """Ids come from the title and text, not the position: dev and train give one paragraph one id."""
    first, _ = read_dataset(write_json(tmp_path / "a.json", HOTPOT))
    second, _ = read_dataset(write_json(tmp_path / "b.json", [HOTPOT[1], HOTPOT[0]]))
    assert {(d.title, d.text, d.id) for d in first} == {(d.title, d.text, d.id) for d in second}
    assert [d.title for d in first] != [d.title for d in second]


def test_flashrag_and_nq_are_questions_alone(tmp_path):
    docs, questions = read_dataset(write_jsonl(tmp_path / "test.jsonl", FLASHRAG))
    assert docs == [] and [(q.id, q.answers, q.gold_doc_ids, q.hops) for q in questions] == [
        ("test_0", ("Wilhelm Conrad Röntgen", "Röntgen"), (), None), ("7", ("8",), (), None),
        ("test_2", (), (), None)]
    path = write_jsonl(tmp_path / "nq-open.jsonl", [NQ[0], "", NQ[1]])  # line numbers are the file's
    docs, questions = read_dataset(path)
    assert docs == [] and [(q.id, q.question, q.answers) for q in questions] == [
        (f"{path}:1", "where is the eiffel tower", ("Paris", "Paris, France")),
        (f"{path}:3", "who wrote hamlet", ("William Shakespeare",))]


@pytest.mark.parametrize("name, content, expected", [
    ("squad.json", SQUAD_V1, "squad"),
    ("squad-pretty.json", SQUAD_V2, "squad"),
    ("hotpot.json", HOTPOT, "hotpotqa"),
    ("2wiki.json", TWO_WIKI, "2wiki"),
    # a 2Wiki type tells it without evidences; HotpotQA's types do not
    ("2wiki-no-evidences.json", [{k: v for k, v in TWO_WIKI[0].items() if k != "evidences"}], "2wiki"),
    ("flashrag.jsonl", FLASHRAG, "flashrag"),
    ("nq.jsonl", NQ, "nq"),
])
def test_the_format_is_detected_from_the_first_record(tmp_path, name, content, expected):
    if name.endswith(".jsonl"):
        path = write_jsonl(tmp_path / name, content)
    else:
        path = write_json(tmp_path / name, content, indent=2 if "pretty" in name else None)
    path = path.rename(tmp_path / "data.txt")  # the name's suffix is not what decides
    assert detect_format(path) == expected


def test_a_named_format_reads_the_same_as_auto_and_one_that_does_not_fit_is_one_error(tmp_path):
    path = write_json(tmp_path / "hotpot.json", HOTPOT)
    assert read_dataset(path, "hotpotqa") == read_dataset(path)
    assert error_of(path, "squad").startswith(f"{path}: expected a JSON object with a 'data' list (squad), found '['")
    assert error_of(path, "squadv2").startswith("format='squadv2': allowed values are auto, squad, hotpotqa, 2wiki")


# Streaming --------------------------------------------------------------------------------------------


def test_values_cut_at_every_chunk_boundary_read_the_same(tmp_path, monkeypatch):
    """Chunks of 1-7 characters cut every number, string, escape and keyword somewhere (a number
    read alone too: a version 12.5e-1 read as 12 would leave ".5e-1" where a comma belongs)."""
    files = [write_json(tmp_path / "squad.json", {**SQUAD_V2, "version": 12.5e-1, "x": [True, None]}, indent=1),
             write_json(tmp_path / "hotpot.json", HOTPOT),
             write_json(tmp_path / "2wiki.json", TWO_WIKI)]
    whole = [read_dataset(f) for f in files]
    for size in range(1, 8):
        monkeypatch.setattr(qa_formats._JsonStream, "CHUNK", size)
        assert [read_dataset(f) for f in files] == whole, size


def test_a_large_file_is_never_held_whole(tmp_path, monkeypatch):
    """The text held at once is a chunk and the example being decoded, not the file."""
    examples = [{**HOTPOT[0], "_id": f"h{i}", "question": f"Question {i}?"} for i in range(400)]
    path = write_json(tmp_path / "big.json", examples)
    held = []
    more = qa_formats._JsonStream._more

    def spy(self):
        grew = more(self)
        held.append(len(self.buf))
        return grew

    monkeypatch.setattr(qa_formats._JsonStream, "CHUNK", 1024)
    monkeypatch.setattr(qa_formats._JsonStream, "_more", spy)
    docs, questions = read_dataset(path)
    assert len(questions) == 400 and len(docs) == 3
    assert path.stat().st_size > 100 * 1024 and max(held) < 2 * 1024


# Errors -----------------------------------------------------------------------------------------------


def squad_with(**qa):
    """SQUAD_V1 with its third question's keys replaced (None: left out)."""
    data = json.loads(json.dumps(SQUAD_V1))
    target = data["data"][0]["paragraphs"][1]["qas"][1]
    for key, value in qa.items():
        target.pop(key) if value is None else target.__setitem__(key, value)
    return data


def hotpot_with(**example):
    data = json.loads(json.dumps(HOTPOT))
    for key, value in example.items():
        data[1].pop(key) if value is None else data[1].__setitem__(key, value)
    return data


QA = "data[0].paragraphs[1].qas[1]"


@pytest.mark.parametrize("content, where, reason", [
    (squad_with(question=None), QA, "'question' must be a non-empty string"),
    (squad_with(question="  "), QA, "'question' must be a non-empty string"),
    (squad_with(id=None), QA, "'id' must be a non-empty string or integer"),
    (squad_with(answers={"text": "911"}), QA, "'answers' must be a list, got an object"),
    (squad_with(answers=[{"text": "911"}, {"answer_start": 3}]), QA + ".answers[1]", "'text' must be a non-empty string"),
    (squad_with(answers=["911"]), QA + ".answers[0]", "expected an answer {text, answer_start}, got a string"),
    (squad_with(answers=[]), QA, "'answers' is empty but 'is_impossible' is not true"),
    (squad_with(is_impossible="yes"), QA, "'is_impossible' must be true or false"),
    (squad_with(question="Who\ud800?"), QA, "holds a lone UTF-16 surrogate escape"),
    ({"data": [{"title": "T", "paragraphs": [{"context": "", "qas": []}]}]}, "data[0].paragraphs[0]",
     "'context' must be a non-empty string"),
    ({"data": [{"title": "T", "paragraphs": {"context": "x"}}]}, "data[0]", "'paragraphs' must be a list, got an object"),
    ({"data": [{"title": 3, "paragraphs": []}]}, "data[0]", "'title' must be a string"),
    ({"data": ["Normans"]}, "data[0]", "expected an article {title, paragraphs}, got a string"),
    (hotpot_with(answer=None), "[1]", "'answer' must be a non-empty string"),
    (hotpot_with(_id=None), "[1]", "'_id' must be a non-empty string or integer"),
    (hotpot_with(context=[["Doctor Strange", "Doctor Strange is a film."]]), "[1].context[0]",
     "expected [title, [sentences]]"),
    (hotpot_with(supporting_facts=[["Doctor Strange", 0], ["Ed Wood", 0]]), "[1].supporting_facts[1]",
     "'Ed Wood' names no paragraph of the example's context with text"),
    (hotpot_with(supporting_facts=[["Empty", 0]]), "[1].supporting_facts[0]", "'Empty' names no paragraph"),
    (hotpot_with(supporting_facts=[["Doctor Strange", "0"]]), "[1].supporting_facts[0]",
     "expected [title, sentence index]"),
    (hotpot_with(supporting_facts=[]), "[1]", "'supporting_facts' is empty"),
    (hotpot_with(context=None), "[1]", "'context' must be a list, got null"),
])
def test_a_bad_json_record_is_one_error_naming_the_file_and_its_json_path(tmp_path, content, where, reason):
    path = write_json(tmp_path / "train.json", content, indent=2)
    assert error_of(path, "hotpotqa" if isinstance(content, list) else "squad").startswith(f"{path}: {where}: {reason}")


@pytest.mark.parametrize("rows, format, reason", [
    ([FLASHRAG[0], {"id": "x", "question": "q?", "golden_answers": "Paris"}], "flashrag",
     "'golden_answers' must be a list, got a string"),
    ([FLASHRAG[0], {"question": "q?", "golden_answers": ["Paris"]}], "flashrag", "'id' must be a non-empty string"),
    ([FLASHRAG[0], {**FLASHRAG[0], "metadata": ["nq"]}], "flashrag", "'metadata' must be a JSON object"),
    ([FLASHRAG[0], {**FLASHRAG[0], "golden_answers": ["Paris", None]}], "flashrag",
     "'golden_answers'[1] must be a non-empty string or a number, got null"),
    ([NQ[0], {"question": "", "answer": ["Paris"]}], "nq", "'question' must be a non-empty string"),
    ([NQ[0], {"question": "q?", "answers": ["Paris"]}], "nq", "'answer' must be a list, got null"),
    ([NQ[0], {"question": "q?", "answer": [True]}], "nq", "'answer'[0] must be a non-empty string or a number"),
    ([NQ[0], ["q?", ["Paris"]]], "nq", "expected a JSON object, got a list"),
    ([NQ[0], '{"question": "q?", '], "nq", "invalid JSON"),
])
def test_a_bad_jsonl_row_is_one_error_naming_file_and_line(tmp_path, rows, format, reason):
    path = write_jsonl(tmp_path / "test.jsonl", [rows[0], "", rows[1]])
    assert error_of(path).startswith(f"{path}:3: {reason}")  # detected from line 1


def test_a_jsonl_line_that_is_not_utf8_is_one_error_naming_it(tmp_path):
    path = tmp_path / "nq.jsonl"
    path.write_bytes(json.dumps(NQ[0]).encode() + b"\n" + '{"question": "Café?", "answer": ["x"]}'.encode("latin-1"))
    assert error_of(path).startswith(f"{path}:2: not UTF-8 text")


ALLOWED = "allowed formats: squad (SQuAD v1.1/v2.0 JSON"


@pytest.mark.parametrize("content, reason", [
    (json.dumps(SQUAD_V1, ensure_ascii=False).replace("Normans", "Normänner").encode("latin-1"), "not UTF-8 text"),
    (b"question,answer\nwho?,me\n", "unknown format (text starting with 'q')"),
    (b"", "unknown format (an empty file)"),
    (b"[]", "unknown format (an empty JSON list)"),
    (b'[{"question": "q?", "answer": "a"}]', "unknown format (a JSON list of objects without 'context'"),
    (b'{"version": "1.1", "articles": []}', "unknown format (a JSON object with keys 'version', 'articles')"),
    (b'{"version": "1.1",\n  "data" [', "not valid JSON (expected ':', found '[' at line 2 column 10)"),
    (b'[{"_id": "h1",\n "context": [}]', "not valid JSON (Expecting value at line 2 column 14)"),
])
def test_a_file_of_no_known_format_is_one_error_naming_it_and_the_formats(tmp_path, content, reason):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    message = error_of(path)
    assert message.startswith(f"{path}: {reason}") and ALLOWED in message


def test_a_syntax_error_is_found_where_it_is_whatever_the_chunks(tmp_path, monkeypatch):
    text = json.dumps(HOTPOT, indent=2).replace('"h2"', '"h2" "')
    with pytest.raises(json.JSONDecodeError) as whole:  # where Python's parser of the whole text finds it
        json.loads(text)
    path = tmp_path / "hotpot.json"
    path.write_text(text, encoding="utf-8")
    for size in (3, 1 << 20):
        monkeypatch.setattr(qa_formats._JsonStream, "CHUNK", size)
        assert error_of(path, "hotpotqa").startswith(
            f"{path}: not valid JSON (Expecting ',' delimiter at line {whole.value.lineno} column {whole.value.colno})")


def test_a_missing_file_is_one_error(tmp_path):
    assert error_of(tmp_path / "nope.json").startswith(f"{tmp_path / 'nope.json'}: cannot be read")


# Converting ---------------------------------------------------------------------------------------------


def test_convert_writes_the_files_kb_build_and_the_evaluator_read(tmp_path):
    out = tmp_path / "out"
    summary = convert(write_json(tmp_path / "dev-v2.0.json", SQUAD_V2), out)
    assert summary == (f"{tmp_path / 'dev-v2.0.json'} (squad) -> {out}: 3 documents, 3 questions "
                       f"(1 answerable, 2 unanswerable), hops 1: 3")
    docs = [json.loads(line) for line in (out / "documents.jsonl").read_text("utf-8").splitlines()]
    assert [(d["title"], d["text"]) for d in docs] == [("Normans", ROLLO), ("Weather", ROLLO), ("Weather", EMPTY_SKY)]
    read = read_questions(out / "questions.jsonl")
    assert [(q.question, q.answers, q.gold_doc_ids) for q in read] == [
        ("Who founded Normandy?", ("Rollo",), (docs[0]["id"],)), ("Who founded Rollo?", (), ()),
        ("What colour is the sea?", (), ())]
    rows = [json.loads(line) for line in (out / "questions.jsonl").read_text("utf-8").splitlines()]
    assert [(r["id"], r["hops"]) for r in rows] == [("u1", 1), ("u2", 1), ("u3", 1)]


def test_convert_refuses_an_out_folder_holding_its_files_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    convert(write_json(tmp_path / "hotpot.json", HOTPOT), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    flashrag = write_jsonl(tmp_path / "test.jsonl", FLASHRAG)
    with pytest.raises(UserError, match=re.escape(f"out={out}: already holds documents.jsonl, questions.jsonl; "
                                                  f"overwrite=true replaces them")):
        convert(flashrag, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    summary = convert(flashrag, out, overwrite=True)
    assert summary.endswith("0 documents (flashrag has no contexts), 3 questions (2 answerable, 1 unanswerable), "
                            "hops unknown")
    # the earlier conversion's documents would pass for the questions' own
    assert sorted(p.name for p in out.iterdir()) == ["questions.jsonl"]
    assert [q.answers for q in read_questions(out / "questions.jsonl")] == [
        ("Wilhelm Conrad Röntgen", "Röntgen"), ("8",), ()]


def test_convert_leaves_the_previous_files_when_a_write_fails_or_the_input_is_bad(tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(write_json(tmp_path / "hotpot.json", HOTPOT), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_json(tmp_path / "bad.json", hotpot_with(answer=None))
    with pytest.raises(UserError, match=r"\[1\]: 'answer'"):
        convert(bad, out, overwrite=True)
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        convert(write_json(tmp_path / "2wiki.json", TWO_WIKI), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries either


def test_a_converted_squad_file_builds_a_knowledge_base_holding_the_gold_documents(tmp_path, capsys):
    from hybridchat.kb import main as kb_main
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    out = tmp_path / "out"
    convert(write_json(tmp_path / "train.json", SQUAD_V1), out)
    with pytest.raises(SystemExit) as e:
        kb_main(["eval", f"questions={out / 'questions.jsonl'}", f"retriever.kb_dir={tmp_path / 'kb'}"])
    assert e.value.code == 2  # no knowledge base yet
    kb_main(["build", f"inputs=[{out / 'documents.jsonl'}]", f"retriever.kb_dir={tmp_path / 'kb'}", "indexes=[bm25]"])
    ids = {d.id for d in KnowledgeBase.open(tmp_path / "kb").documents}
    gold = {i for q in read_questions(out / "questions.jsonl") for i in q.gold_doc_ids}
    assert len(ids) == 2 and gold == ids
    capsys.readouterr()
    kb_main(["eval", f"questions={out / 'questions.jsonl'}", f"retriever.kb_dir={tmp_path / 'kb'}",
             f"json={tmp_path / 'report.json'}"])
    assert json.loads((tmp_path / "report.json").read_text())["recall@3"] == 1.0  # every gold id is found


# The command -------------------------------------------------------------------------------------------


def run_qa(argv, capsys):
    """(exit code, stdout, stderr) of python -m hybridchat.qa."""
    from hybridchat.qa import main

    return command_result(main, argv, capsys)


def test_the_convert_command_writes_the_files_and_refuses_to_replace_them(tmp_path, capsys):
    src, out = write_json(tmp_path / "dev.json", HOTPOT), tmp_path / "out"
    code, stdout, err = run_qa(["convert", f"input={src}", f"out={out}"], capsys)
    assert code == 0, err
    assert stdout == f"{src} (hotpotqa) -> {out}: 3 documents, 2 questions (2 answerable, 0 unanswerable), hops 2: 2\n"
    assert [q.answers for q in read_questions(out / "questions.jsonl")] == [("yes",), ("Scott Derrickson",)]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, err = run_qa(["convert", f"input={src}", f"out={out}", "format=2wiki"], capsys)
    assert (code, stdout) == (2, "") and err == (f"error: out={out}: already holds documents.jsonl, questions.jsonl; "
                                                 f"overwrite=true replaces them, or give another out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, stdout, err = run_qa(["convert", f"input={src}", f"out={out}", "format=2wiki", "overwrite=true"], capsys)
    assert code == 0 and stdout.startswith(f"{src} (2wiki) -> {out}: 3 documents"), err


@pytest.mark.parametrize("make_args, message", [
    (lambda src, out: [f"out={out}"], "error: convert needs input=FILE and out=FOLDER"),
    (lambda src, out: [f"input={src}"], "error: convert needs input=FILE and out=FOLDER"),
    (lambda src, out: [f"input={src}", f"out={out}", "format=csv"], "error: format='csv': allowed values are auto, squad"),
    (lambda src, out: [f"input={src}", f"out={out}", "format=nq"], "error: {src}:1: expected a JSON object, got a list"),
    (lambda src, out: [f"input={src.with_name('bad.json')}", f"out={out}"],
     "error: {bad}: data[0].paragraphs[1].qas[1]: 'question' must be a non-empty string"),
])
def test_a_bad_convert_command_is_one_error_line_and_exit_code_2(tmp_path, capsys, make_args, message):
    src, out = write_json(tmp_path / "dev.json", HOTPOT), tmp_path / "out"
    bad = write_json(tmp_path / "bad.json", squad_with(question=""))
    code, stdout, err = run_qa(["convert", *make_args(src, out)], capsys)
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1
    assert err.startswith(message.format(src=src, bad=bad))
    assert not out.exists()
