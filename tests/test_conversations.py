"""Chat JSONL reader: valid files round-trip, every bad line is a UserError naming file:line."""

import json
import re

import pytest

from hybridchat.core.errors import UserError
from hybridchat.data.conversations import read_conversations

USER = {"role": "user", "content": "Where was Bivi Metheita born?"}
ASSISTANT = {"role": "assistant", "content": "Bivi Metheita was born in Barport."}
SYSTEM = {"role": "system", "content": "Answer from the documents."}


def write_lines(tmp_path, lines, name="chats.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines) + "\n",
                    encoding="utf-8")
    return path


def test_valid_file_round_trips(tmp_path):
    conversations = [
        [USER, ASSISTANT],
        [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "And when?\nPlease say the year."},
         {"role": "assistant", "content": ""}],
        # Written unescaped: a reader splitting lines at U+2028 too would cut this JSON in two.
        [{"role": "user", "content": "Ünïcödé \u2028 line separator"}, ASSISTANT],
    ]
    lines = [{"messages": conversations[0], "id": 7},  # extra keys are ignored
             "", "   ",  # blank lines are skipped
             {"messages": conversations[1]},
             {"messages": [dict(conversations[2][0], name="x"), ASSISTANT]}]
    assert read_conversations(write_lines(tmp_path, lines)) == conversations
    assert read_conversations(str(write_lines(tmp_path, lines))) == conversations  # a str path too


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": [USER, ASSISTANT]}).encode() + b"\r\n")
    assert read_conversations(path) == [[USER, ASSISTANT]]


GOOD = {"messages": [USER, ASSISTANT]}


@pytest.mark.parametrize("bad,message", [
    ('{"messages": [', "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),  # nesting too deep for the parser: RecursionError
    ("[1, 2]", "expected a JSON object.*got an array"),
    ('"hello"', "expected a JSON object.*got a string"),
    ({"conversation": [USER, ASSISTANT]}, 'no "messages" key'),
    ({"messages": []}, '"messages" is an empty array'),
    ({"messages": "hi"}, '"messages" is a string'),
    ({"messages": [USER, "hello"]}, r"messages\[1\] is a string; each message must be an object"),
    ({"messages": [{"role": "bot", "content": "hi"}, ASSISTANT]},
     r"messages\[0\] has role 'bot'; allowed roles: system, user, assistant"),
    ({"messages": [{"content": "hi"}, ASSISTANT]}, r"messages\[0\] has no role; allowed roles: system, user"),
    ({"messages": [USER, {"role": "assistant", "content": None}]}, r"messages\[1\] content is null"),
    ({"messages": [USER, {"role": "assistant", "content": ["a"]}]}, r"messages\[1\] content is an array"),
    ({"messages": [USER, {"role": "assistant"}]}, r"messages\[1\] has no content"),
    ({"messages": [USER, SYSTEM, ASSISTANT]}, r"messages\[1\] is a system message; only the first"),
    ({"messages": [SYSTEM, SYSTEM, USER, ASSISTANT]}, r"messages\[1\] is a system message"),
    ({"messages": [ASSISTANT, USER]}, r"messages\[0\] is from the assistant, expected the user"),
    ({"messages": [SYSTEM, ASSISTANT]}, r"messages\[1\] is from the assistant, expected the user"),
    ({"messages": [USER, USER, ASSISTANT]}, r"messages\[1\] is from the user, expected the assistant"),
    ({"messages": [USER, ASSISTANT, ASSISTANT]}, r"messages\[2\] is from the assistant, expected the user"),
    ({"messages": [USER]}, "ends with a user message; it must end with an assistant reply"),
    ({"messages": [SYSTEM, USER, ASSISTANT, USER]}, "ends with a user message"),
    ({"messages": [SYSTEM]}, "ends with only a system message"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, [GOOD, "", bad, GOOD])  # the bad conversation is on line 3
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:3: .*{message}") as error:
        read_conversations(path)
    assert "\n" not in str(error.value)


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: not UTF-8"):
        read_conversations(path)


def test_missing_file_folder_and_empty_file(tmp_path):
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'nope.jsonl'))}: no such file"):
        read_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path))}: is a folder"):
        read_conversations(tmp_path)
    with pytest.raises(UserError, match="no conversations"):
        read_conversations(write_lines(tmp_path, ["", "  "]))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=f"^{re.escape(str(empty))}: no conversations"):
        read_conversations(empty)


def test_anything_loads_or_raises_user_error(tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8)
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | json_values},
                                     optional={"content": st.text(max_size=5) | json_values}) | json_values
    # Well-formed conversations too, so that whole files load often enough to check what comes back.
    exchanges = st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), min_size=1, max_size=2)
    valid = st.tuples(st.booleans(), exchanges).map(lambda t: {"messages": [SYSTEM] * t[0] + [
        {"role": role, "content": text} for pair in t[1] for role, text in zip(("user", "assistant"), pair)]})
    lines = st.lists(
        st.binary(max_size=30)
        | json_values.map(json.dumps).map(str.encode)
        | st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}).map(json.dumps).map(str.encode)
        | valid.map(json.dumps).map(str.encode),
        max_size=3)
    path = tmp_path_factory.mktemp("hypothesis") / "chats.jsonl"

    @hypothesis.settings(max_examples=100, deadline=None, database=None)
    @hypothesis.given(lines)
    def check(chunks):
        path.write_bytes(b"\n".join(chunks))
        try:
            conversations = read_conversations(path)
        except UserError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            return
        for conversation in conversations:
            roles = [m["role"] for m in conversation]
            body = roles[1:] if roles[0] == "system" else roles
            assert body and body == ["user", "assistant"] * (len(body) // 2)
            assert all(isinstance(m["content"], str) and set(m) == {"role", "content"} for m in conversation)

    check()
