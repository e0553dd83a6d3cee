"""The question record and its one JSONL reader: what a file may hold, the one-line error for each
bad row, and round trips (the world's questions and a user's file, written out and read back)."""

import json
import re

import pytest

from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question, read_questions
from hybridchat.data.world import World, WorldConfig


def write(path, lines: list[str | dict]) -> str:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def error_of(path) -> str:
    """The one-line error reading path ends in."""
    with pytest.raises(UserError) as e:
        read_questions(path)
    assert "\n" not in str(e.value)
    return str(e.value)


GOOD = {"question": "Where was Ana Tor born?", "answers": ["Vellport"], "gold_doc_ids": ["person-0001"]}


@pytest.mark.parametrize("row, key, reason", [
    ({"answers": ["x"], "gold_doc_ids": ["d"]}, "question", "must be a non-empty string"),
    ({**GOOD, "question": "   "}, "question", "must be a non-empty string"),
    ({**GOOD, "question": 7}, "question", "must be a non-empty string"),
    ({**GOOD, "answers": 5}, "answers", "must be a list of strings"),
    ({**GOOD, "answers": "Vellport"}, "answers", "must be a list of strings"),
    ({**GOOD, "answers": [None]}, "answers", "must be a list of strings"),
    ({**GOOD, "answers": [True]}, "answers", "must be a list of strings"),
    ({**GOOD, "answers": [["Vellport"]]}, "answers", "must be a list of strings"),
    ({**GOOD, "gold_doc_ids": "person-0001"}, "gold_doc_ids", "must be a list of document ids"),
    ({**GOOD, "gold_doc_ids": [1]}, "gold_doc_ids", "must be a list of document ids"),
    ({**GOOD, "gold_doc_ids": {"id": "person-0001"}}, "gold_doc_ids", "must be a list of document ids"),
])
def test_a_bad_row_is_one_error_naming_file_line_and_key(tmp_path, row, key, reason):
    # line 2 is blank: line numbers are the file's, not the count of questions
    path = write(tmp_path / "q.jsonl", [GOOD, "", row])
    assert re.fullmatch(rf"{re.escape(path)}:3: '{key}' {reason}.*", error_of(path))


@pytest.mark.parametrize("line, reason", [
    ('{"question": "q?", ', "invalid JSON"),
    ('["q?", ["a"], ["d"]]', "expected a JSON object"),
    ('"q?"', "expected a JSON object"),
    ("1" * 5000, "invalid JSON"),  # an integer too long to convert
    ('{"question": "Caf\xe9?"}', "not UTF-8"),  # written as latin-1
])
def test_a_line_that_is_no_question_object_is_one_error_naming_file_and_line(tmp_path, line, reason):
    path = tmp_path / "q.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + line.encode("latin-1") + b"\n")
    assert error_of(path).startswith(f"{path}:2: {reason}")


def test_an_unreadable_or_empty_file_is_one_error(tmp_path):
    assert error_of(tmp_path / "missing.jsonl").startswith(f"{tmp_path / 'missing.jsonl'}: cannot be read")
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot be read")  # a folder
    assert error_of(write(tmp_path / "empty.jsonl", ["", "  "])) == f"{tmp_path / 'empty.jsonl'}: no questions"


def test_unanswerable_rows_and_left_out_keys_read_as_empty_and_numbers_as_strings(tmp_path):
    path = write(tmp_path / "q.jsonl", [
        "\ufeff" + json.dumps(GOOD),  # a byte order mark on line 1 is not part of the JSON
        {"question": "Where was Nobody born?", "answers": [], "gold_doc_ids": []},
        {"question": "Who?", "answers": None, "gold_doc_ids": None},
        {"question": "Who else?"},
        {"question": "How many?", "answers": [3, 2.5], "gold_doc_ids": ["d"], "notes": "ignored"}])
    assert read_questions(path) == [
        Question("Where was Ana Tor born?", ("Vellport",), ("person-0001",), id=f"{path}:1"),
        Question("Where was Nobody born?", id=f"{path}:2"),
        Question("Who?", id=f"{path}:3"),
        Question("Who else?", id=f"{path}:4"),
        Question("How many?", ("3", "2.5"), ("d",), id=f"{path}:5")]


def test_the_worlds_questions_written_out_read_back_the_same(tmp_path):
    world = World.generate(WorldConfig(n_people=40, n_companies=10, n_universities=5))
    asked = world.questions("heldout", 2) + world.questions("train", 1) + world.unanswerable_questions(5)
    path = write(tmp_path / "world.jsonl", [q.to_json() for q in asked])
    read = read_questions(path)
    # id and hops come back (what evaluate's 2-hop detection and answers.jsonl read); split is the world's own
    assert [(q.question, q.answers, q.gold_doc_ids, q.id, q.hops) for q in read] == [
        (q.question, q.answers, q.gold_doc_ids, q.id, q.hops) for q in asked]
    assert {q.hops for q in read} == {1, 2} and all(q.id.startswith("person-") for q in read[:3])
    again = read_questions(write(tmp_path / "again.jsonl", [q.to_json() for q in read]))
    assert again == read


@pytest.mark.parametrize("row, key, reason", [
    ({**GOOD, "id": 7}, "id", "must be a non-empty string"),
    ({**GOOD, "id": " "}, "id", "must be a non-empty string"),
    ({**GOOD, "hops": 0}, "hops", "must be an integer >= 1"),
    ({**GOOD, "hops": "2"}, "hops", "must be an integer >= 1"),
    ({**GOOD, "hops": True}, "hops", "must be an integer >= 1"),
    ({**GOOD, "hops": 1.5}, "hops", "must be an integer >= 1"),
])
def test_a_bad_id_or_hops_is_one_error_naming_file_line_and_key(tmp_path, row, key, reason):
    path = write(tmp_path / "q.jsonl", [row])
    assert re.fullmatch(rf"{re.escape(path)}:1: '{key}' {reason}.*", error_of(path))


def test_id_and_hops_are_read_where_given(tmp_path):
    """By hand: a row's own id replaces where it was read; hops null is unknown, as left out."""
    path = write(tmp_path / "q.jsonl", [{**GOOD, "id": "hq-1", "hops": 2}, {**GOOD, "hops": None}])
    assert [(q.id, q.hops) for q in read_questions(path)] == [("hq-1", 2), (f"{path}:2", None)]


def test_the_worlds_json_row_holds_the_documented_keys_and_where_it_comes_from():
    q = World.generate(WorldConfig(n_people=40, n_companies=10, n_universities=5)).questions("heldout", 2)[0]
    assert q.to_json() == {"id": q.id, "question": q.question, "answers": list(q.answers),
                           "gold_doc_ids": list(q.gold_doc_ids), "hops": 2, "split": "heldout"}
    assert len(q.gold_doc_ids) == 2 and q.candidates == ()


def test_a_question_is_multi_hop_by_its_hops_where_given_else_by_two_gold_documents():
    """evaluate's detection, by hand: a 2Wiki bridge comparison (hops 4, four gold documents) and a
    comparison (hops 2) are multi-hop; a row without hops is by its two gold documents; SQuAD's hops 1
    with two gold ids (a paragraph listed twice over) is not."""
    from hybridchat.evaluate import is_multi_hop

    assert is_multi_hop(Question("q", ("a",), ("d1", "d2", "d3", "d4"), hops=4))
    assert is_multi_hop(Question("q", ("a",), ("d1", "d2"), hops=2))
    assert is_multi_hop(Question("q", ("a",), ("d1", "d2")))
    assert not is_multi_hop(Question("q", ("a",), ("d1", "d2", "d3")))
    assert not is_multi_hop(Question("q", ("a",), ("d1", "d2"), hops=1))
