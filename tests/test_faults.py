"""kill -9 in the middle of a write: the previous knowledge base / checkpoint survives whole.

A small driver script (written here, not a hook in production code) wraps one function inside the
child process so that the child SIGKILLs itself at a chosen point of the write; all kill points of
one kind run as parallel child processes. Afterwards the previous state must open, search or load,
and a fresh write must work.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {"id": "d1", "title": "Volcanoes", "text": "Lava erupts from volcanoes when magma pressure builds."},
    {"id": "d2", "title": "Glaciers", "text": "Glaciers carve valleys as ice slowly flows downhill."},
    {"id": "d3", "title": "Deserts", "text": "Sand dunes move with the wind across hot deserts."},
]
NEW = {"id": "d4", "title": "Tides", "text": "The moon's gravity raises ocean tides twice a day."}

# Imported by every child: die() at a point, and wrappers that die before or after a function runs.
KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, __ROOT__)

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def before(module, name, when=lambda *a, **k: True):
        original = getattr(module, name)
        def wrapped(*args, **kwargs):
            if when(*args, **kwargs):
                die()
            return original(*args, **kwargs)
        setattr(module, name, wrapped)

    def after(module, name, when=lambda *a, **k: True):
        original = getattr(module, name)
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            if when(*args, **kwargs):
                die()
            return result
        setattr(module, name, wrapped)

    def fork_each(points, body):
        # body(point) in a forked child per point (imports paid once); prints their exit codes
        import json, traceback
        codes = {}
        for point in points:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    body(point)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    code = 3
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            codes[point] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(json.dumps(codes))
""").replace("__ROOT__", repr(str(ROOT)))


def run_driver(tmp_path, script: str, *argv) -> dict[str, int]:
    """Run `script` (which calls fork_each) and return each point's exit code (-9: killed)."""
    driver = tmp_path / "driver.py"
    driver.write_text(KILLER + textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(driver), *map(str, argv)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- knowledge base: `kb add` killed while it writes the new directory ---------------------------

KB_DRIVER = """
    from hybridchat.core import fsutil
    from hybridchat.kb import main
    from hybridchat.retrieval import knowledge_base as kbm

    KILL_POINTS = {
        "documents_written": lambda: before(kbm, "build_bm25"),  # new documents.jsonl, no index yet
        "bm25_written": lambda: after(kbm, "build_bm25"),        # documents + bm25, simple not yet
        "indexes_written": lambda: after(kbm, "build_tfidf"),    # documents + both indexes, no manifest
        "before_swap": lambda: before(fsutil, "_exchange"),      # complete new directory, not swapped in
        "after_swap": lambda: after(fsutil, "_exchange"),        # swapped in, previous not yet deleted
        "none": lambda: None,
    }

    def add(point):
        KILL_POINTS[point]()
        main(["add", f"inputs=[{sys.argv[1]}]", f"retriever.kb_dir={sys.argv[2]}/{point}/kb"])

    fork_each(sys.argv[3].split(","), add)
"""
KB_POINTS = ["documents_written", "bm25_written", "indexes_written", "before_swap", "after_swap"]


def kb_main(argv):
    from hybridchat.kb import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def kb_ids(path):
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    return sorted(d.id for d in KnowledgeBase.open(path).documents)


def top_hit(path, query, kind="bm25"):
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    return KnowledgeBase.open(path).retriever(RetrieverConfig(kind=kind)).search([query], 1)[0][0].document.id


def test_kb_add_killed_at_any_point_leaves_a_whole_knowledge_base(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps(NEW) + "\n")
    kbs = {}
    for point in KB_POINTS + ["none"]:
        kbs[point] = tmp_path / point / "kb"
        assert kb_main(["build", f"inputs=[{src}]", f"retriever.kb_dir={kbs[point]}", "indexes=[bm25,simple]"]) == 0
    codes = run_driver(tmp_path, KB_DRIVER, new, tmp_path, ",".join(KB_POINTS + ["none"]))
    assert codes.pop("none") == 0  # the driver itself works: without a kill point the add completes
    assert codes == {p: -signal.SIGKILL for p in KB_POINTS}
    for point in KB_POINTS:
        kb = kbs[point]
        # Before the swap the previous version is what opens; after it, the new one: never a mix.
        expected = ["d1", "d2", "d3", "d4"] if point == "after_swap" else ["d1", "d2", "d3"]
        assert kb_ids(kb) == expected, point
        for kind in ("bm25", "simple"):
            assert top_hit(kb, "magma lava volcanoes", kind) == "d1", (point, kind)
        # The lock died with the child, leftovers of the killed write do not get in the way.
        if point != "after_swap":
            assert kb_main(["add", f"inputs=[{new}]", f"retriever.kb_dir={kb}"]) == 0, (point, capsys.readouterr().err)
        assert kb_ids(kb) == ["d1", "d2", "d3", "d4"]
        assert top_hit(kb, "moon gravity tides") == "d4" and top_hit(kb, "moon gravity tides", "simple") == "d4"
        assert kb_main(["delete", "ids=[d2]", f"retriever.kb_dir={kb}"]) == 0 and kb_ids(kb) == ["d1", "d3", "d4"]


# ---- checkpoints: checkpoint.save killed while it writes step 2 ----------------------------------

CKPT_DRIVER = """
    import inspect
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from hybridchat.infra import checkpoint

    from hybridchat.core import fsutil
    from hybridchat.model.config import ModelConfig
    from hybridchat.model.lm import HybridLM

    class StubTokenizer:  # checkpoint.save may store the run's tokenizer beside the weights
        fingerprint = "stub"

        def save(self, path):
            Path(path).write_text("{}")

    def save(directory, step):
        kwargs = {"tokenizer": StubTokenizer()} if "tokenizer" in inspect.signature(checkpoint.save).parameters else {}
        return checkpoint.save(directory, step, model, [opt], {"note": f"step {step}"}, 1, **kwargs)

    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**MODEL), vocab_size=32)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step():
        idx = torch.randint(0, 32, (2, 8))
        model(idx, targets=idx).backward()
        opt.step()
        opt.zero_grad()

    root, points = Path(sys.argv[1]), sys.argv[2].split(",")
    train_step()
    for point in points:  # every point starts from the same complete step 1 (keep=1)
        save(root / point / "ckpt", 1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "ref_model.safetensors"))
    save_file({f"{pid}.{k}": v for pid, state in opt.state_dict()["state"].items() for k, v in state.items()
               if torch.is_tensor(v)}, str(root / "ref_opt.safetensors"))
    train_step()

    def nth_call(n):
        calls = []

        def when(*args, **kwargs):
            calls.append(1)
            return len(calls) == n
        return when

    KILL_POINTS = {
        "after_model": lambda: before(checkpoint, "save_file", nth_call(2)),     # optimizer not yet written
        "after_optimizer": lambda: after(checkpoint, "save_file", nth_call(2)),  # meta.json not yet written
        "before_rename": lambda: before(fsutil.os, "replace",                    # complete, under its temp name
                                        lambda src, dst, *a, **k: Path(dst).name == "step_000002"),
        "before_prune": lambda: before(checkpoint.shutil, "rmtree",              # step 2 in place, step 1 kept
                                       lambda path, *a, **k: Path(path).name == "step_000001"),
        "none": lambda: None,
    }

    def save_step_2(point):
        KILL_POINTS[point]()
        save(root / point / "ckpt", 2)

    fork_each(points, save_step_2)
"""
CKPT_POINTS = ["after_model", "after_optimizer", "before_rename", "before_prune"]
MODEL = dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8, headdim=16, mlp_ratio=1,
             chunk_size=8)


def test_checkpoint_save_killed_at_any_point_keeps_the_previous_checkpoint(tmp_path):
    import inspect

    import torch
    from safetensors.torch import load_file

    from hybridchat.infra import checkpoint
    from hybridchat.model.config import ModelConfig
    from hybridchat.model.lm import HybridLM

    script = f"MODEL = {MODEL!r}\n" + textwrap.dedent(CKPT_DRIVER)
    codes = run_driver(tmp_path, script, tmp_path, ",".join(CKPT_POINTS + ["none"]))
    assert codes.pop("none") == 0  # the driver itself works: without a kill point step 2 is saved
    assert codes == {p: -signal.SIGKILL for p in CKPT_POINTS}
    assert checkpoint.latest(tmp_path / "none" / "ckpt").name == "step_000002"
    ref_model = load_file(str(tmp_path / "ref_model.safetensors"))
    ref_opt = load_file(str(tmp_path / "ref_opt.safetensors"))
    for point in CKPT_POINTS:
        directory = tmp_path / point / "ckpt"
        expected = "step_000002" if point == "before_prune" else "step_000001"
        assert [p.name for p in checkpoint.list_checkpoints(directory)] == \
            (["step_000001", "step_000002"] if point == "before_prune" else ["step_000001"]), point
        latest = checkpoint.latest(directory)
        assert latest is not None and latest.name == expected, (point, latest)
        model = HybridLM(ModelConfig(**MODEL), vocab_size=32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        assert checkpoint.load(latest, model, [opt])["step"] == int(expected[-1])
        if point != "before_prune":  # exactly step 1's weights and optimizer state
            assert all(torch.equal(t, ref_model[name]) for name, t in model.state_dict().items()), point
            state = {f"{pid}.{k}": v for pid, s in opt.state_dict()["state"].items() for k, v in s.items()
                     if torch.is_tensor(v)}
            assert state.keys() == ref_opt.keys() and all(torch.equal(state[k], ref_opt[k]) for k in state), point
        # The half-written temp folder does not block the next save.
        kwargs = {}
        if "tokenizer" in inspect.signature(checkpoint.save).parameters:
            kwargs["tokenizer"] = type("T", (), {"fingerprint": "stub",
                                                 "save": lambda self, p: Path(p).write_text("{}")})()
        checkpoint.save(directory, 3, model, [opt], {}, 1, **kwargs)
        assert [p.name for p in checkpoint.list_checkpoints(directory)] == ["step_000003"]
        checkpoint.load(checkpoint.latest(directory), model, [opt])
