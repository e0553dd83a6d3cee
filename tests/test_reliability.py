"""Bad inputs end in one `error:` line and exit code 2, never a traceback, and nothing on disk is damaged.

Each test here pins a bug that once ended in a traceback (or, for the umask, in unreadable folders).
The command-line tests run the real entry points in a subprocess, so a traceback cannot hide.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybridchat.core.errors import UserError
from hybridchat.core.fsutil import atomic_directory, atomic_write_text
from hybridchat.data.sources import DataConfig, files_source

try:  # Document moved from hybridchat.retrieval.documents to hybridchat.core.documents
    from hybridchat.core.documents import Document
except ImportError:  # pragma: no cover
    from hybridchat.retrieval.documents import Document

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {"id": "d1", "title": "Volcanoes", "text": "Lava erupts from volcanoes when magma pressure builds."},
    {"id": "d2", "title": "Glaciers", "text": "Glaciers carve valleys as ice slowly flows downhill."},
    {"id": "d3", "title": "Deserts", "text": "Sand dunes move with the wind across hot deserts."},
]


def cli(*argv, cwd=None, env=None):
    """(exit code, stdout, stderr) of `python -m <argv>` in a fresh process."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True, text=True, cwd=cwd or ROOT,
                       env=full_env, timeout=120)
    return p.returncode, p.stdout, p.stderr


def assert_one_error(code, err, *needles):
    """Exit 2, the last stderr line is the only `error:` line and names every needle, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def built_kb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    src = write_jsonl(tmp / "docs.jsonl", DOCS)
    code, _, err = cli("hybridchat.kb", "build", f"inputs=[{src}]", f"retriever.kb_dir={tmp / 'kb'}", "indexes=[bm25,simple]")
    assert code == 0, err
    return tmp / "kb"


@pytest.fixture
def kb(built_kb, tmp_path):
    """A fresh copy of a small bm25 + simple knowledge base (built once by the real CLI)."""
    shutil.copytree(built_kb, tmp_path / "kb")
    return tmp_path / "kb"


# ---- data=text: the text field must be a string --------------------------------------------------

def text_source(path):
    return files_source(path, DataConfig(name="text", path=str(path), val_fraction=0.5))


@pytest.mark.parametrize("line, got", [('{"text": 5}', "got int"), ('{"text": null}', "got null"),
                                       ('{"text": ["a", "b"]}', "got list"), ('{"text": {"a": 1}}', "got dict"),
                                       ("5", "got int"), ('"just a string"', "got str"),
                                       ('{"body": "x"}', "no field")])
def test_jsonl_text_field_that_is_not_a_string_names_file_line_and_key(tmp_path, line, got):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a fine first line"}\n\n' + line + "\n")
    with pytest.raises(UserError) as e:
        list(text_source(corpus)("train", 0)) + list(text_source(corpus)("val", 0))
    message = str(e.value)
    assert message.startswith(f"{corpus}:3: ") and "data.text_key='text'" in message and got in message
    assert "\n" not in message


def test_jsonl_bytes_that_are_not_utf8_name_their_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl:2: not UTF-8"):
        list(text_source(corpus)("val", 0)) + list(text_source(corpus)("train", 0))


def test_jsonl_lone_surrogate_escape_becomes_replacement_character(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a\\ud800b"}\n{"text": "smile \\ud83d\\ude00"}\n')
    docs = list(text_source(corpus)("val", 0)) + list(text_source(corpus)("train", 0))
    assert docs == ["a\ufffdb", "smile \U0001F600"]
    for d in docs:
        d.encode("utf-8")  # what the tokenizer's cache hash does with every document


def test_parquet_null_and_non_string_column_name_file_row_and_key(tmp_path):
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["first", "second", None, "fourth"]}), nulls)
    with pytest.raises(UserError) as e:
        list(text_source(nulls)("train", 0)) + list(text_source(nulls)("val", 0))
    assert str(e.value).startswith(f"{nulls}: row 2: ") and "data.text_key='text'" in str(e.value)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    with pytest.raises(UserError, match=r"numbers.parquet: column data.text_key='text' must hold strings, "
                                        r"it holds int64"):
        list(text_source(numbers)("train", 0))


def test_file_that_is_not_parquet_is_named(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 but not really")
    with pytest.raises(UserError, match=r"fake.parquet: not a readable parquet file"):
        list(text_source(fake)("train", 0))


def test_train_entry_point_ends_a_bad_text_field_with_one_error_line(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "one"}, {"text": 5}])
    code, _, err = cli("hybridchat.train", "data=text", f"data.path={corpus}",
                       f"paths.outputs={tmp_path / 'out'}", "hydra.run.dir=" + str(tmp_path / "run"))
    assert_one_error(code, err, f"{corpus}:2", "data.text_key='text'", "got int")


# ---- knowledge bases: damaged files, missing questions, bad counts --------------------------------

@pytest.mark.parametrize("damage, where", [
    (lambda lines: lines[:1] + ['{"id": "d2", "title": "Glac'] + lines[2:], "documents.jsonl:2: damaged"),
    (lambda lines: lines[:2] + ["[1, 2]"] + lines[3:], "documents.jsonl:3: damaged"),
    (lambda lines: lines[:1] + ['{"id": "d2"}'] + lines[2:], "documents.jsonl:2: damaged"),
    (lambda lines: lines[:2], "holds 2 documents but manifest.json says 3"),
])
def test_damaged_documents_jsonl_is_one_error_naming_file_and_line(kb, damage, where):
    docs = kb / "documents.jsonl"
    docs.write_text("\n".join(damage(docs.read_text().splitlines())) + "\n")
    before = snapshot(kb)
    new = write_jsonl(kb.parent / "new.jsonl", [{"id": "n", "text": "new"}])
    for argv in (["search", "query=lava", f"retriever.kb_dir={kb}"], ["stats", f"retriever.kb_dir={kb}"],
                 ["add", f"inputs=[{new}]", f"retriever.kb_dir={kb}"]):
        code, _, err = cli("hybridchat.kb", *argv)
        assert_one_error(code, err, where, "rebuild")
    assert snapshot(kb) == before


def test_damaged_manifest_and_index_files_are_one_error_each(kb):
    manifest = json.loads((kb / "manifest.json").read_text())
    (kb / "manifest.json").write_text(json.dumps({**manifest, "indexes": ["bm25"]}))
    assert_one_error(*cli("hybridchat.kb", "stats", f"retriever.kb_dir={kb}")[::2], "manifest.json: unreadable")
    (kb / "manifest.json").write_text(json.dumps(manifest))
    for f in (kb / "bm25").iterdir():
        f.write_bytes(b"\x00garbage")
    (kb / "simple" / "postings.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert_one_error(*cli("hybridchat.kb", "search", "query=lava", f"retriever.kb_dir={kb}")[::2], "bm25 index is damaged")
    assert_one_error(*cli("hybridchat.kb", "search", "query=lava", f"retriever.kb_dir={kb}", "retriever=simple")[::2],
                     "simple index is damaged")


def test_eval_with_missing_or_bad_questions_file(kb, tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert_one_error(*cli("hybridchat.kb", "eval", f"questions={missing}", f"retriever.kb_dir={kb}")[::2],
                     f"{missing}: cannot be read")
    bad = write_jsonl(tmp_path / "q.jsonl", [{"question": "lava?", "gold_doc_ids": ["d1"], "answers": 5}])
    assert_one_error(*cli("hybridchat.kb", "eval", f"questions={bad}", f"retriever.kb_dir={kb}")[::2],
                     f"{bad}:1: 'answers' must be a list")


@pytest.mark.parametrize("option", ["retriever.top_k=0", "retriever.top_k=-3", "retriever.dense.nprobe=0"])
def test_search_counts_below_one_are_refused(kb, option):
    assert_one_error(*cli("hybridchat.kb", "search", "query=lava", f"retriever.kb_dir={kb}", option)[::2], option,
                     "must be >= 1")


def test_search_k1_still_returns_one_hit(kb):
    code, out, err = cli("hybridchat.kb", "search", "query=magma lava", f"retriever.kb_dir={kb}", "retriever.top_k=1")
    assert code == 0, err
    assert out.splitlines()[0].startswith(" 1. Volcanoes  [d1]") and " 2. " not in out


# ---- folders and files follow the umask ----------------------------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_directory_and_file_modes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    reference_dir, reference_file = tmp_path / "plain", tmp_path / "plain.txt"
    reference_dir.mkdir()
    reference_file.write_text("x")
    with atomic_directory(tmp_path / "step_000001") as tmp:
        (tmp / "meta.json").write_text("{}")
    atomic_write_text(tmp_path / "tok.json", "{}")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "step_000001") == 0o777 & ~mask == mode(reference_dir)
    assert mode(tmp_path / "tok.json") == 0o666 & ~mask == mode(reference_file)
    with atomic_directory(tmp_path / "step_000001") as tmp:  # replacing keeps following the umask
        (tmp / "meta.json").write_text("{}")
    assert mode(tmp_path / "step_000001") == 0o777 & ~mask


def test_checkpoint_and_knowledge_base_folders_and_files_are_group_readable_with_umask_002(tmp_path, umask):
    import torch

    from hybridchat.infra import checkpoint
    from hybridchat.model.config import ModelConfig
    from hybridchat.model.lm import HybridLM
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    umask(0o002)
    model = HybridLM(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8,
                                 headdim=16, mlp_ratio=1), vocab_size=16)
    from hybridchat.data.tokenizer import Tokenizer

    step = checkpoint.save(tmp_path / "ckpt", 1, model, [torch.optim.AdamW(model.parameters())], {}, keep=2,
                           tokenizer=Tokenizer.train(["some text"], 300))
    kb = KnowledgeBase.build(tmp_path / "kb", [Document(d["id"], d["title"], d["text"]) for d in DOCS], ["bm25"],
                             RetrieverConfig(), progress=False)
    for folder in (step, kb.path, kb.path / "bm25"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o775, folder
    # every file too: safetensors wrote the weights 0600 beside a 0664 meta.json
    files = [p for folder in (step, kb.path) for p in folder.rglob("*") if p.is_file()]
    assert {"model.safetensors", "optimizer.safetensors", "meta.json"} <= {p.name for p in files}
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in files} == {str(p): 0o664 for p in files}


def test_filter_over_list_metadata_matches_any_element():
    from hybridchat.retrieval.base import filter_mask

    docs = [Document("a", "", "t", {"tags": ["x", "y"]}), Document("b", "", "t", {"tags": "x"}),
            Document("c", "", "t", {"tags": {"k": 1}}), Document("d", "", "t", {"tags": ["z"]})]
    assert filter_mask(docs, {"tags": "x"}).tolist() == [True, True, False, False]


@pytest.mark.parametrize("argv, needle", [
    (["search", "query=lava", "retriever.top_k=abc"], "retriever.top_k=abc"), (["search", "k=3"], "Key 'k' not in 'KbConfig'"),
    ([], "the first word is the command"), (["frob"], "got 'frob'"), (["search"], "search needs query=")])
def test_kb_usage_mistakes_are_one_error_line_too(argv, needle):
    code, _, err = cli("hybridchat.kb", *argv)
    assert_one_error(code, err, needle)
    assert err.count("\n") == 1  # no usage block before it


@pytest.mark.parametrize("app, override, needles", [
    ("hybridchat.train", "stage_typo=3", ["stage_typo", "+stage_typo=3", "not in 'Config'"]),  # no such key
    ("hybridchat.train", "gpu.micro_batchh=3", ["gpu.micro_batchh", "not in 'GPUConfig'"]),    # a typo in a group
    ("hybridchat.train", "gpu.memory_gb=lots", ["gpu.memory_gb=lots", "could not be converted"]),  # wrong type
    ("hybridchat.train", "model=foo", ["model/foo", "Available options in 'model'", "hybrid_tiny"]),  # no such option
    ("hybridchat.train", "seed=[", ["no viable alternative at input '['"]),                    # bad override syntax
    ("hybridchat.evaluate", "n_questionz=3", ["n_questionz", "not in 'EvalConfig'"]),
    ("hybridchat.plan", "model=foo", ["model/foo", "Available options in 'model'"]),
    ("hybridchat.train", "stage.matrix_lr=-0.01", ["stage.matrix_lr=-0.01 must be >= 0"]),     # out of range
])
def test_command_lines_that_do_not_compose_are_one_error_line(app, override, needles, tmp_path):
    """Hydra's own report is several lines and exit code 1; ours is one line naming the key and what
    is allowed, exit code 2, before any work starts."""
    # cwd: a value checked inside the app (matrix_lr) leaves Hydra's run folder under ./outputs, not the repo's.
    code, _, err = cli(app, override, env={"OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert_one_error(code, err, *needles)
    assert "Config search path" not in err


@pytest.mark.parametrize("quoted", [False, True])
def test_arguments_that_are_not_utf8_are_one_error_line(kb, quoted):
    """Bytes that are not UTF-8 in a kb search query or chat's prompt were a TypeError traceback from
    the tokenizer (quoted) or Hydra's lexer error (unquoted); the argument is shown with its byte."""
    q = "'" if quoted else ""
    for app, argv, shown in (("hybridchat.kb", ["search", f"query={q}caf\udce9{q}", f"retriever.kb_dir={kb}"],
                              f"query={q}caf\\xe9{q}"),
                             ("hybridchat.chat", [f"prompt={q}caf\udce9?{q}"], f"prompt={q}caf\\xe9?{q}")):
        code, out, err = cli(app, *argv)
        assert_one_error(code, err, f"the argument {shown} is not UTF-8 text (byte 0xe9 at character",
                         "give text in UTF-8")
        assert out == ""


@pytest.mark.parametrize("app", ["hybridchat.train", "hybridchat.evaluate", "hybridchat.chat", "hybridchat.plan"])
@pytest.mark.parametrize("flags, needle", [(["-m", "model=transformer_tiny,mamba_tiny", "--cfg", "job"], "--multirun"),
                                           (["--resolve"], "--resolve")])
def test_hydra_flags_that_do_not_go_together_are_one_error_line(app, flags, needle):
    """`train -m ... --cfg job` was Hydra's ValueError traceback."""
    code, out, err = cli(app, *flags, env={"OMP_NUM_THREADS": "1"})
    assert_one_error(code, err, needle, "leave out -m")
    assert out == ""


def test_training_again_under_a_run_name_is_refused_and_overwrite_replaces_the_earlier_steps(tmp_path):
    """An earlier run's higher steps outlived a new run's (pruning keeps the highest numbers): the
    printed checkpoint vanished and the next stage started from the old weights. A second run into an
    occupied stage folder is refused, naming the ways on, with the earlier checkpoints untouched;
    overwrite=true replaces them, and the printed checkpoint is the one that remains."""
    common = ["debug=smoke", f"paths.outputs={tmp_path}", "run_name=r", f"hydra.run.dir={tmp_path}/run"]
    stage_dir = tmp_path / "checkpoints" / "r" / "pretrain"
    code, out, err = cli("hybridchat.train", *common, "stage.num_steps=6")
    assert code == 0, err
    assert sorted(p.name for p in stage_dir.iterdir()) == ["step_000003", "step_000006"]
    before = snapshot(stage_dir)

    code, out, err = cli("hybridchat.train", *common, "stage.num_steps=2")
    assert_one_error(code, err, str(stage_dir), "step_000003, step_000006", "resume=true", "run_name=",
                     "overwrite=true")
    assert snapshot(stage_dir) == before

    code, out, err = cli("hybridchat.train", *common, "stage.num_steps=2", "overwrite=true")
    assert code == 0, err
    printed = Path(out.split("checkpoint: ")[1].split()[0])
    assert printed == stage_dir / "step_000002" and (printed / "meta.json").is_file()
    assert sorted(p.name for p in stage_dir.iterdir()) == ["step_000002"]


@pytest.mark.parametrize("command", ["build", "add"])
def test_kb_input_that_does_not_exist_is_one_line_naming_it(kb, tmp_path, command):
    """Was a FileNotFoundError traceback for a missing .jsonl; nothing is written."""
    missing = tmp_path / "nowhere.jsonl"
    target = kb if command == "add" else tmp_path / "new_kb"
    before = snapshot(kb)
    assert_one_error(*cli("hybridchat.kb", command, f"inputs=[{missing}]", f"retriever.kb_dir={target}")[::2],
                     f"{missing}: no such file or folder")
    assert snapshot(kb) == before and not (tmp_path / "new_kb").exists()


@pytest.mark.parametrize("app, override, needle", [
    ("hybridchat.evaluate", "n_questions=0", "n_questions=0 must be >= 1"),  # was: every question evaluated
    ("hybridchat.chat", "prompt='   '", "prompt= is empty"),                # was: the model answered nothing
])
def test_empty_requests_are_refused_before_any_model_runs(app, override, needle, tmp_path):
    assert_one_error(*cli(app, override, f"paths.outputs={tmp_path}")[::2], needle)


def test_a_confidence_that_is_not_a_number_is_never_printed_as_one():
    """Damaged weights answered with "confidence: nan" beside a fluent reply."""
    import io
    from types import SimpleNamespace

    from hybridchat.chat import _print_outcome

    for value, shown in ((0.8123, "confidence: 0.81"), (float("nan"), "confidence: undefined"),
                         (float("inf"), "confidence: undefined")):
        out = io.StringIO()
        _print_outcome(SimpleNamespace(abstained=False, below_threshold=False, over_abstention=False, citations=[], cited=[],
                                       confidence=value), out, None)
        assert shown in out.getvalue() and "nan" not in out.getvalue() and "inf" not in out.getvalue()
