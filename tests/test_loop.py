"""The training loop (training/loop.py) driven directly: a toy stage on a 2-layer model, no data
pipeline; losses, gradient norms, schedules and checkpoints against plain computations and hand values."""

import dataclasses
import re

import pytest
import torch
from conftest import CKPT_MODEL, TOY_MODEL, TOY_VOCAB, StubTokenizer

from hybridchat.core.errors import UserError
from hybridchat.model.lm import HybridLM

# ---- optimizers ----------------------------------------------------------------------------------

def test_optimizers_follow_the_recipe_muon_for_block_matrices_adamw_for_the_rest():
    """Muon (momentum 0.95, lr scaled the "original" way, stage weight decay) takes the 2-D matrices
    inside blocks; AdamW (betas 0.8/0.95, eps 1e-10, no decay) takes embedding, head and the rest, each
    group at its stage lr, in that order; initial_lr is the lr the schedule multiplies."""
    from hybridchat.infra.config import StageConfig
    from hybridchat.training.loop import build_optimizers
    from hybridchat.training.muon import Muon

    model = HybridLM(dataclasses.replace(CKPT_MODEL, norm_weights=True), vocab_size=50)
    s = StageConfig(matrix_lr=0.03, embedding_lr=0.2, unembedding_lr=0.007, scalar_lr=0.5, weight_decay=0.05)
    muon, adamw = build_optimizers(model, s)
    named = dict(model.named_parameters())
    matrices = [n for n, p in named.items() if n.startswith("blocks.") and p.ndim == 2]
    rest = [n for n in named if n not in matrices and n not in ("wte.weight", "lm_head.weight")]
    names = {id(p): n for n, p in named.items()}
    assert type(muon) is Muon and muon.ns_dtype is None and len(muon.param_groups) == 1
    group = muon.param_groups[0]
    assert sorted(names[id(p)] for p in group["params"]) == sorted(matrices)
    assert (group["lr"], group["initial_lr"], group["momentum"], group["weight_decay"], group["adjust_lr_fn"]) == \
        (0.03, 0.03, 0.95, 0.05, "original")
    assert type(adamw) is torch.optim.AdamW
    assert [[names[id(p)] for p in g["params"]] for g in adamw.param_groups] == \
        [["wte.weight"], ["lm_head.weight"], rest]
    assert [(g["lr"], g["initial_lr"]) for g in adamw.param_groups] == [(0.2, 0.2), (0.007, 0.007), (0.5, 0.5)]
    assert all((g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.95), 1e-10, 0.0) for g in adamw.param_groups)


# ---- a toy stage on a tiny model -----------------------------------------------------------------

class ListTracker:
    def __init__(self):
        self.records = []

    def log(self, step, **metrics):
        self.records.append((step, metrics))

    def values(self, key):
        return [(step, m[key]) for step, m in self.records if key in m]


def toy_stage_class():
    from hybridchat.training.stages import Stage

    class ToyStage(Stage):
        """Fixed random batches; records what the loop asks of it."""

        name = "toy"
        monitor = "val/loss"

        def __init__(self, ctx, on_step=None):
            super().__init__(ctx)
            g = torch.Generator().manual_seed(0)
            rows, length = ctx.config.gpu.micro_batch, ctx.config.model.sequence_len
            self.batches = [{"inputs": torch.randint(0, TOY_VOCAB, (rows, length), generator=g),
                             "targets": torch.randint(0, TOY_VOCAB, (rows, length), generator=g)} for _ in range(64)]
            self.val = self.batches[-1:]
            self.starts, self.steps, self.evaluated, self.initialised = [], 0, 0, []
            self.on_step = on_step

        def initialise(self, model, source):
            self.initialised.append((model, source))

        def train_batches(self, start, rank, world_size):
            self.starts.append((start, rank, world_size))
            return iter(self.batches[start:])

        def val_batches(self):
            return self.val

        def training_step(self, model, batch):
            self.steps += 1
            loss = self.on_step(self, model) if self.on_step is not None else None  # a loss of its own, or None
            return model(batch["inputs"], batch["targets"]) if loss is None else loss

        def evaluate(self, model):
            self.evaluated += 1
            with torch.no_grad():
                return {"val/loss": model(self.val[0]["inputs"], self.val[0]["targets"]).item()}

        def step_metrics(self):
            return {"toy/micro_steps": self.steps}

    return ToyStage


def toy_run(tmp_path, *, on_step=None, resume=False, overwrite=False, micro_batch=2, gpu=None, seed=0, source=None,
            setup=None, progress=False, **stage):
    """(stage, ctx, tracker, summary or the exception) of loop.train on the toy stage."""
    from hybridchat.infra.config import Config, GPUConfig, PathsConfig, StageConfig
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.training import loop

    stage_cfg = StageConfig(**{"num_steps": 4, "warmup_steps": 0, "eval_every": 2, "checkpoint_every": 2,
                               "keep_checkpoints": 10, **stage})
    config = Config(model=TOY_MODEL, gpu=GPUConfig(micro_batch=micro_batch, **(gpu or {})), stage=stage_cfg,
                    paths=PathsConfig(checkpoints=str(tmp_path)), run_name="toy", resume=resume, overwrite=overwrite,
                    progress=progress)
    torch.manual_seed(seed)
    model = HybridLM(TOY_MODEL, vocab_size=TOY_VOCAB)
    model.init_weights()
    ctx = RunContext(config, Runtime(torch.device("cpu"), None), model)
    ctx.tokenizer = StubTokenizer()
    ctx.source_checkpoint = source
    toy, tracker = toy_stage_class()(ctx, on_step), ListTracker()
    if setup is not None:
        setup(toy)
    try:
        return toy, ctx, tracker, loop.train(toy, ctx, tracker, {"toy": True})
    except Exception as e:  # noqa: BLE001 - the tests look at it
        return toy, ctx, tracker, e


def loop_messages(caplog, summary):
    """The loop's log lines before its last, which must be rank 0's checksum of the final weights."""
    *before, last = caplog.messages
    assert last == f"rank 0 final parameter checksum {summary['param_checksum']:.10e}"
    return before


def test_loop_logs_loss_gradient_norm_and_throughput_of_the_whole_accumulated_step(tmp_path, monkeypatch):
    """One step of 2 micro-batches of 2 rows: the logged loss and gradient norm are those of the 4 rows'
    mean loss on the initial weights (a plain forward and backward on a copy built alike), tokens per
    second counts both micro-batches (a fake clock at 100 s: 0.25 s per step), and MFU = flops per token x
    tokens / seconds / peak."""
    import types

    from hybridchat.training import loop

    clock = iter(100 + i * 0.25 for i in range(1000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    torch.manual_seed(0)
    ref = HybridLM(TOY_MODEL, vocab_size=TOY_VOCAB)
    ref.init_weights()
    toy, _, tracker, summary = toy_run(tmp_path, num_steps=1, total_batch_tokens=32, gpu={"peak_tflops_bf16": 2.0})
    assert isinstance(summary, dict), summary
    inputs = torch.cat([toy.batches[0]["inputs"], toy.batches[1]["inputs"]])
    targets = torch.cat([toy.batches[0]["targets"], toy.batches[1]["targets"]])
    loss = ref(inputs, targets)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    [(step, metrics)] = [(s, m) for s, m in tracker.records if "train/loss" in m]
    assert step == 1 and toy.steps == 2
    assert metrics["train/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert metrics["train/tok_per_s"] == 32 / 0.25
    assert metrics["train/mfu"] == ref.flops_per_token() * 32 / 0.25 / 2e12  # the same float operations
    assert metrics["train/lr_mult"] == 1.0 and metrics["toy/micro_steps"] == 2


def test_loop_evaluates_and_saves_on_schedule_and_sums_up_the_run(tmp_path):
    """5 steps, eval_every=2, checkpoint_every=2, 2 micro-batches a step: evaluations at steps 0, 2, 4
    and the end; checkpoints at 2 and 4 and the end, each meta.json holding the stage, run, tokenizer,
    data position (steps x micro-batches) and the resolved config; the summary's first/final metric and
    a checksum that is the plain sum of the final weights."""
    import json

    toy, ctx, tracker, summary = toy_run(tmp_path, num_steps=5, eval_every=2, checkpoint_every=2,
                                         total_batch_tokens=32)
    assert isinstance(summary, dict), summary
    vals = dict(tracker.values("val/loss"))
    assert list(vals) == [0, 2, 4, 5] and toy.evaluated == 4
    assert [s for s, _ in tracker.values("train/loss")] == [1, 2, 3, 4, 5]
    stage_dir = tmp_path / "toy" / "toy"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["step_000002", "step_000004", "step_000005"]
    meta = json.loads((stage_dir / "step_000004" / "meta.json").read_text())
    assert (meta["step"], meta["stage"], meta["run_name"], meta["tokenizer"], meta["data_position"], meta["config"]) \
        == (4, "toy", "toy", "stub", 8, {"toy": True})
    assert type(meta["data_position"]) is int  # a batch index: 8, not 8.0
    assert summary["first"] == vals[0] and summary["final"] == vals[5] and summary["metrics"] == {"val/loss": vals[5]}
    assert summary["checkpoint"] == str(stage_dir / "step_000005") and summary["checkpoint_dir"] == str(stage_dir)
    assert summary["start_step"] == 0 and summary["monitor"] == "val/loss"
    checksum = sum(float(p.detach().double().sum()) for p in ctx.model.parameters())
    assert summary["param_checksum"] == pytest.approx(checksum, rel=1e-12, abs=1e-12)
    assert toy.starts == [(0, 0, 1)] and toy.initialised == []


def test_loop_resumes_at_the_latest_checkpoint_its_step_weights_and_data_position(tmp_path, caplog):
    """A run stopped after its step-2 checkpoint, resumed (from another initialisation): it starts at step 2
    at data position 2 steps x 2 micro-batches, with step 2's weights (its first evaluation equals the
    straight run's at step 2); the source checkpoint is not loaded then. resume=true with nothing saved
    starts from scratch and says so."""
    import logging
    import shutil

    _, _, straight, _ = toy_run(tmp_path / "a", num_steps=4, checkpoint_every=2, total_batch_tokens=32)
    shutil.rmtree(tmp_path / "a" / "toy" / "toy" / "step_000004")
    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):
        toy, _, tracker, summary = toy_run(tmp_path / "a", resume=True, seed=1, source=tmp_path / "src",
                                           num_steps=4, checkpoint_every=2, total_batch_tokens=32)
    assert isinstance(summary, dict), summary
    assert toy.starts == [(4, 0, 1)] and summary["start_step"] == 2 and toy.initialised == []
    assert [s for s, _ in tracker.values("train/loss")] == [3, 4]
    assert tracker.values("val/loss")[0] == (2, dict(straight.values("val/loss"))[2])
    assert loop_messages(caplog, summary) == [f"resumed from {tmp_path / 'a' / 'toy' / 'toy' / 'step_000002'} at step 2"]
    caplog.clear()
    _, _, _, error = toy_run(tmp_path / "a", num_steps=1)  # a new run (resume=false) into the folder: refused ...
    assert isinstance(error, UserError) and "already holds checkpoints of an earlier run" in str(error)
    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):  # ... unless overwrite=true: not resumed
        toy, _, _, summary = toy_run(tmp_path / "a", overwrite=True, num_steps=1)
    assert toy.starts == [(0, 0, 1)] and summary["start_step"] == 0 and loop_messages(caplog, summary) == []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):
        toy, _, _, summary = toy_run(tmp_path / "b", resume=True, num_steps=1)
    assert toy.starts == [(0, 0, 1)] and summary["start_step"] == 0
    assert loop_messages(caplog, summary) == [f"resume=true but {tmp_path / 'b' / 'toy' / 'toy'} holds no "
                                              f"checkpoint: starting from scratch"]


def test_loop_initialises_from_the_source_checkpoint_when_not_resuming(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):
        toy, ctx, _, summary = toy_run(tmp_path, source=tmp_path / "src" / "step_000009", num_steps=1)
    assert isinstance(summary, dict), summary
    assert toy.initialised == [(ctx.model, tmp_path / "src" / "step_000009")]
    assert loop_messages(caplog, summary) == [f"initialised from {tmp_path / 'src' / 'step_000009'}"]


def test_loop_applies_the_schedule_to_every_optimizer_group(tmp_path, monkeypatch):
    """Hand values: 4 steps, 2 of warmup, round(0.5 x 4) = 2 of warmdown to 0.2: each group's lr is
    its initial lr times 0.5, 1, 1, 0.6 during the steps."""
    from hybridchat.training import loop

    built, seen = [], []
    build = loop.build_optimizers
    monkeypatch.setattr(loop, "build_optimizers", lambda model, s: built.append(build(model, s)) or built[-1])

    def record(toy, model):
        seen.append({round(g["lr"] / g["initial_lr"], 9) for opt in built[0] for g in opt.param_groups})

    _, _, tracker, summary = toy_run(tmp_path, on_step=record, num_steps=4, warmup_steps=2, warmdown_ratio=0.5,
                                     final_lr_frac=0.2)
    assert isinstance(summary, dict), summary
    assert seen == [{0.5}, {1.0}, {1.0}, {0.6}]
    assert [v for _, v in tracker.values("train/lr_mult")] == pytest.approx([0.5, 1.0, 1.0, 0.6])


def test_loop_stops_on_a_non_finite_loss_naming_the_step(tmp_path):
    def poison(toy, model):
        if toy.steps == 2:
            with torch.no_grad():
                model.wte.weight.fill_(float("nan"))

    _, _, _, error = toy_run(tmp_path, on_step=poison, num_steps=4)
    assert isinstance(error, RuntimeError)
    assert str(error) == "training loss became nan at step 2; lower the learning rates"


def test_loop_refuses_a_validation_set_without_one_batch(tmp_path):
    def no_val(toy):
        toy.val = []

    _, _, _, error = toy_run(tmp_path, setup=no_val, num_steps=2)
    assert isinstance(error, UserError)
    assert str(error) == ("stage=toy: the validation split gives no batches (of text: less than one sequence of "
                          "model.sequence_len=8 tokens)")


def test_loop_saves_once_and_stops_at_the_step_a_stop_signal_arrives(tmp_path, caplog):
    """SIGUSR1 during step 2 (a real signal to this process): step 2 ends, its checkpoint is written once,
    Preempted names the signal and the step, a warning says where it saved and how to continue; no
    further step runs."""
    import logging
    import os
    import signal

    from hybridchat.infra.preemption import Preempted

    def signal_at_step_2(toy, model):
        if toy.steps == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    with caplog.at_level(logging.WARNING, logger="hybridchat.training.loop"):
        toy, _, tracker, error = toy_run(tmp_path, on_step=signal_at_step_2, num_steps=6, checkpoint_every=2)
    assert isinstance(error, Preempted) and (error.signum, error.step) == (signal.SIGUSR1, 2)
    assert caplog.messages == [f"stopped by SIGUSR1 after step 2: saved {tmp_path / 'toy' / 'toy' / 'step_000002'}; "
                               f"run the same command with resume=true to continue (launchers/slurm.sh passes it)"]
    assert toy.steps == 2 and [s for s, _ in tracker.values("train/loss")] == [1, 2]
    assert [p.name for p in (tmp_path / "toy" / "toy").iterdir()] == ["step_000002"]


def test_loop_runs_under_the_chosen_attention_backend(tmp_path, monkeypatch):
    """gpu.attention_backend=math enters SDPA's math-only context around training; auto enters none."""
    from contextlib import contextmanager

    from torch.nn.attention import SDPBackend

    from hybridchat.infra.config import AttentionBackend
    from hybridchat.training import loop

    entered = []

    @contextmanager
    def recording_kernel(backend):
        entered.append(backend)
        yield

    monkeypatch.setattr(loop, "sdpa_kernel", recording_kernel)
    _, _, _, summary = toy_run(tmp_path / "m", num_steps=1, gpu={"attention_backend": AttentionBackend.math})
    assert isinstance(summary, dict) and entered == [SDPBackend.MATH]
    _, _, _, summary = toy_run(tmp_path / "a", num_steps=1)
    assert isinstance(summary, dict) and entered == [SDPBackend.MATH]


def test_loop_saves_milestones_off_the_checkpoint_grid_and_never_prunes_them(tmp_path):
    """A stage's milestone steps are saved although checkpoint_every does not fall on them and survive
    keep_checkpoints=1; the final step is saved once."""
    def milestones(toy):
        toy.milestones = frozenset({1, 3})

    _, _, _, summary = toy_run(tmp_path, setup=milestones, num_steps=6, checkpoint_every=4, keep_checkpoints=1)
    assert isinstance(summary, dict), summary
    assert sorted(p.name for p in (tmp_path / "toy" / "toy").iterdir()) == ["step_000001", "step_000003",
                                                                             "step_000006"]


def test_loop_refuses_to_resume_a_checkpoint_of_another_tokenizer(tmp_path):
    """The run's tokenizer differs from the one the checkpoint was trained with: resuming is one UserError
    (mutant: the fingerprint not passed to checkpoint.load)."""
    toy_run(tmp_path, num_steps=2, checkpoint_every=1)

    def other_tokenizer(toy):
        toy.ctx.tokenizer = type("Other", (StubTokenizer,), {"fingerprint": "other"})()

    _, _, _, error = toy_run(tmp_path, setup=other_tokenizer, resume=True, num_steps=4)
    assert isinstance(error, UserError)
    assert "was trained with tokenizer stub, this run built other" in str(error)


def test_loop_progress_bar_counts_the_stages_steps_only_when_asked(tmp_path, capsys, monkeypatch):
    """progress=true: a bar named after the stage on stderr, ending at num_steps of num_steps, showing the
    last loss and tokens/s, also for a resumed run that starts at its checkpoint's step; progress=false:
    no bar (mutants: desc, initial, total or postfix dropped, the disable condition inverted or loosened)."""
    import tqdm

    # No monitor thread: a process that forks afterwards (mutmut's workers) could inherit its lock held.
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)
    _, _, tracker, _ = toy_run(tmp_path, num_steps=4, checkpoint_every=2, progress=True)
    err = capsys.readouterr().err
    assert "toy: 100%" in err and "4/4" in err
    last_loss = tracker.values("train/loss")[-1][1]
    assert re.search(rf"loss={last_loss:.3f}, tok_s=[0-9][0-9,]*\]", err)  # the step's loss and tokens/s
    toy_run(tmp_path / "quiet", num_steps=4, checkpoint_every=2)
    assert "toy" not in capsys.readouterr().err
    (tmp_path / "toy" / "toy" / "step_000004").rename(tmp_path / "moved")
    toy_run(tmp_path, num_steps=4, checkpoint_every=2, resume=True, progress=True)
    err = capsys.readouterr().err
    assert "toy:  50%" in err and "2/4" in err and "4/4" in err and "0/4" not in err


def test_loop_leaves_parameters_outside_a_steps_loss_untouched(tmp_path):
    """Step 2's loss involves the embedding alone: every other parameter keeps step 1's value (their
    gradients are None, so AdamW and Muon skip them; zeroed gradients would still move them with the
    momentum of step 1)."""
    before = {}

    def embedding_only_at_step_2(toy, model):
        if toy.steps == 2:
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})
            return (model.wte.weight ** 2).mean()
        return None

    _, ctx, _, summary = toy_run(tmp_path, on_step=embedding_only_at_step_2, num_steps=2)
    assert isinstance(summary, dict), summary
    after = dict(ctx.model.named_parameters())
    assert not torch.equal(after["wte.weight"], before["wte.weight"])
    assert [n for n in before if n != "wte.weight" and not torch.equal(after[n], before[n])] == []


def test_loop_summary_of_a_resumed_run_without_an_evaluation_before_the_end(tmp_path):
    """Resumed at step 3 of 4 with eval_every=2: no evaluation falls inside the steps run, so there is
    no first value of the monitored metric, only the final evaluation's."""
    import shutil

    toy_run(tmp_path, num_steps=4, checkpoint_every=3)
    shutil.rmtree(tmp_path / "toy" / "toy" / "step_000004")
    toy, _, tracker, summary = toy_run(tmp_path, resume=True, num_steps=4, checkpoint_every=3)
    assert isinstance(summary, dict), summary
    assert summary["start_step"] == 3 and tracker.values("val/loss") == [(4, summary["final"])]
    assert "first" not in summary and summary["final"] == summary["metrics"]["val/loss"] and toy.evaluated == 1
