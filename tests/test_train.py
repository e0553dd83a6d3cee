"""End-to-end pretraining: smoke run, checkpoints, resume equivalence, bad inputs, every pattern trains."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import assert_evaluation_changed_no_training, compose_config, train_at_eval_cadence, train_steps

from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra import checkpoint
from hybridchat.infra.config import StageConfig
from hybridchat.infra.context import RunContext
from hybridchat.infra.runtime import Runtime, grad_accum_steps
from hybridchat.model.blocks import PATTERN_PRESETS
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.train import run, typed_config
from hybridchat.training.loop import build_optimizers
from hybridchat.training.runs import load_run
from hybridchat.training.stages import lr_multiplier
from hybridchat.training.stages.pretrain import PretrainStage

# One xdist worker for the whole file (make test's --dist loadgroup): its module fixture trains once for the file; one
# test runs torchrun.
pytestmark = pytest.mark.xdist_group("train")

ROOT = Path(__file__).resolve().parents[1]


def train(overrides: list[str], run_dir: Path) -> float:
    return run(compose_config(overrides, output_dir=run_dir))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    overrides = ["debug=smoke", f"paths.outputs={out}", "run_name=smoke"]
    final_bpb = train(overrides, out / "run")
    return out, overrides, final_bpb


def test_smoke_run_writes_metrics_plot_and_loadable_checkpoint(smoke_run):
    out, overrides, final_bpb = smoke_run
    records = read_metrics(out / "run")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and all(l > 0 for l in losses)
    assert losses[-1] < losses[0]
    assert (out / "run" / "metrics.png").stat().st_size > 1000
    ckpt = checkpoint.latest(out / "checkpoints" / "smoke" / "pretrain")
    assert ckpt is not None and ckpt.name == "step_000006"
    meta = checkpoint.read_meta(ckpt)
    assert meta["architecture"]["block_pattern"] == "MA"
    assert meta["config"]["model"]["n_embd"] == 64 and meta["tokenizer"]
    model = HybridLM(ModelConfig(**meta["config"]["model"]), meta["architecture"]["vocab_size"])
    checkpoint.load(ckpt, model)
    assert final_bpb == pytest.approx(records[-1]["val/bpb"])


def test_pretrain_validation_smaller_than_a_micro_batch_is_one_batch_of_all_it_holds(smoke_run):
    """A large GPU's micro_batch on a small corpus (seen on an H200: micro_batch auto = 64 at 2048
    tokens) evaluates on every validation sequence in one smaller batch; a split that fills
    micro_batches gives exactly the loader's batches."""
    from hybridchat.data.loader import token_batches

    out, overrides, _ = smoke_run
    for micro_batch in (2, 100_000):
        config, _ = typed_config(compose_config(overrides + [f"gpu.micro_batch={micro_batch}"], output_dir=out / "v"))
        ctx = RunContext(config, Runtime(torch.device("cpu"), None))
        val = PretrainStage(ctx).val_batches()
        seq = config.model.sequence_len
        every_row = list(token_batches(ctx.text, "val", ctx.tokenizer, 1, seq, loop=False))
        if micro_batch == 2:
            expected = list(islice(token_batches(ctx.text, "val", ctx.tokenizer, 2, seq, loop=False),
                                   config.stage.eval_batches))
        else:
            assert len(every_row) < micro_batch
            expected = [{k: torch.cat([r[k] for r in every_row]) for k in ("inputs", "targets")}]
        assert len(val) == len(expected) >= 1
        for got, want in zip(val, expected):
            assert torch.equal(got["inputs"], want["inputs"]) and torch.equal(got["targets"], want["targets"])


def test_a_compiled_run_trains_like_the_eager_one(smoke_run, tmp_path):
    """gpu.compile=true (what every GPU preset sets) through the one loop, here with Inductor's CPU
    backend: the same losses as the eager smoke run, step for step."""
    out, overrides, _ = smoke_run
    compiled = overrides[:1] + [f"paths.outputs={tmp_path}", "run_name=smoke", "gpu.compile=true"]
    train(compiled, tmp_path / "run")
    losses = [[r["train/loss"] for r in read_metrics(d) if "train/loss" in r] for d in (out / "run", tmp_path / "run")]
    assert len(losses[1]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_evaluating_more_often_trains_the_same_weights(tmp_path):
    """stage.eval_every changes when the model is judged, never what it learns: evaluation draws from
    no stream training draws from (hybridchat/core/seeds.py)."""
    runs = [train_at_eval_cadence(train, ["debug=smoke"], tmp_path, tmp_path, "pretrain", every) for every in (1, 6)]
    assert_evaluation_changed_no_training(*runs)


def test_the_run_seed_orders_the_pretraining_text_and_the_tokenizer_reads_it_unshuffled():
    from hybridchat.data.sources import world_source
    from hybridchat.data.world import World, WorldConfig

    world = World.generate(WorldConfig(n_people=60))
    own = world.pretraining_texts("train")
    orders = {seed: list(world_source(world, seed)("train", 0)) for seed in (0, 1)}
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(own)  # every text once, whatever the seed
    assert orders[0] != orders[1] and orders[0] != own
    assert list(world_source(world, 0)("train", 0)) == orders[0]  # the same seed, the same order
    assert list(world_source(world, 0)("train", 1)) not in (orders[0], own)  # a fresh order each epoch
    assert list(world_source(world)("train", 3)) == own  # no seed: the world's own order (the tokenizer's)
    assert list(world_source(world, 0)("val", 2)) == world.pretraining_texts("val")  # validation never moves


def test_samples_are_greedy_continuations_up_to_a_document_boundary(smoke_run):
    """The pretrain stage's samples against a plain loop: full forward, argmax, stop at <|bos|>."""
    out, overrides, _ = smoke_run
    run = load_run(checkpoint.latest(out / "checkpoints" / "smoke" / "pretrain"))
    model, tokenizer = run.model, run.tokenizer
    config, _ = typed_config(compose_config(overrides, output_dir=out / "run"))
    ctx = RunContext(config, Runtime(torch.device("cpu"), None), model)
    completions = PretrainStage(ctx).samples(model, max_new_tokens=8)
    assert len(completions) == 3
    for prompt, completion in completions:
        ids, new = [tokenizer.bos_id] + tokenizer.encode(prompt), []
        with torch.no_grad():
            for _ in range(8):
                token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if token == tokenizer.bos_id:
                    break
                new.append(token)
        assert new and completion == tokenizer.decode(new).strip()


def monitor_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("val/bpb"))


def test_resume_gives_the_same_loss_curve(tmp_path, capsys):
    common = ["debug=smoke", f"paths.outputs={tmp_path}", "stage.checkpoint_every=3", "stage.eval_every=2"]
    train(common + ["run_name=straight"], tmp_path / "straight")
    # Interrupt after step 3: a run that has only the step-3 checkpoint, resumed with resume=true.
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "straight" / "pretrain" / "step_000003", ckpts / "resumed" / "pretrain" / "step_000003")
    capsys.readouterr()
    train(common + ["run_name=resumed", "resume=true"], tmp_path / "resumed")
    bpb = {r["step"]: r["val/bpb"] for r in read_metrics(tmp_path / "resumed") if "val/bpb" in r}
    assert monitor_line(capsys.readouterr().out) == f"val/bpb {bpb[4]:.4f} -> {bpb[6]:.4f}"
    # Resumed where no evaluation falls before the last: one value, not "val/bpb x -> x".
    shutil.copytree(ckpts / "straight" / "pretrain" / "step_000003", ckpts / "late" / "pretrain" / "step_000003")
    train(common + ["run_name=late", "resume=true", "stage.eval_every=6"], tmp_path / "late")
    [late] = [r["val/bpb"] for r in read_metrics(tmp_path / "late") if "val/bpb" in r]
    assert monitor_line(capsys.readouterr().out) == (f"val/bpb {late:.4f} (resumed at step 3: no evaluation before "
                                                     f"the last to compare with)")
    straight = {(r["step"], k): v for r in read_metrics(tmp_path / "straight") for k, v in r.items()
                if k in ("train/loss", "val/bpb")}
    resumed = {(r["step"], k): v for r in read_metrics(tmp_path / "resumed") for k, v in r.items()
               if k in ("train/loss", "val/bpb")}
    assert {step for step, _ in resumed} == {4, 5, 6}
    for key, value in resumed.items():
        assert value == pytest.approx(straight[key], rel=1e-5, abs=1e-6), key


def test_every_block_pattern_trains():
    """The earlier attempt sent Mamba's 1-D/3-D parameters to Muon and no Mamba model could train."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (4, 33))
    for name in PATTERN_PRESETS:
        cfg = ModelConfig(n_layer=4, n_embd=64, n_head=2, n_kv_head=1, block_pattern=name, d_state=16, headdim=16,
                          chunk_size=8, sequence_len=32)
        model = HybridLM(cfg, vocab_size=97)
        model.init_weights()
        optimizers = build_optimizers(model, StageConfig(matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.02))
        assert all(p.ndim == 2 for p in optimizers[0].param_groups[0]["params"])
        losses = train_steps(model, optimizers, tokens, 8)
        assert losses[-1] < losses[0] - 0.1, f"{name}: {losses}"


def test_matrix_optimizer_adamw_moves_each_matrix_weight_by_its_learning_rate_on_the_first_step():
    """AdamW's first step is lr x sign(gradient) for every weight (bias-corrected m / sqrt(v) = g / |g|);
    Muon's orthogonalised update is not. The hand value tells which optimizer the matrices got."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, block_pattern="all_attention", sequence_len=16)
    model = HybridLM(cfg, vocab_size=97)
    model.init_weights()
    (opt,) = build_optimizers(model, StageConfig(matrix_optimizer="adamw", matrix_lr=1e-3, weight_decay=0.0))
    matrices = model.param_groups()["matrix"]
    before = [p.detach().clone() for p in matrices]
    loss = model(torch.randint(0, 97, (2, 16)), targets=torch.randint(0, 97, (2, 16)))
    loss.backward()
    opt.step()
    for p, b in zip(matrices, before):
        moved = (p.detach() - b).abs()
        moved = moved[p.grad.abs() > 1e-6]
        assert torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=1e-3), moved
    with pytest.raises(UserError, match="stage.matrix_optimizer='sgd'"):
        StageConfig(matrix_optimizer="sgd").check()


def test_grad_accumulation_must_divide():
    assert grad_accum_steps(8192, 8, 256, 2) == 2
    assert grad_accum_steps(None, 8, 256, 2) == 1
    with pytest.raises(UserError, match="stage.total_batch_tokens"):
        grad_accum_steps(1000, 8, 256, 1)


def test_checkpoint_of_another_pattern_is_refused(smoke_run, tmp_path):
    out, overrides, _ = smoke_run
    with pytest.raises(UserError, match="block_pattern"):
        train(overrides + ["resume=true", "model.block_pattern=all_attention"], tmp_path / "run")


def test_corrupted_checkpoint_is_one_clear_error(smoke_run, tmp_path):
    out, _, _ = smoke_run
    src = checkpoint.latest(out / "checkpoints" / "smoke" / "pretrain")
    bad = tmp_path / "step_000006"
    bad.mkdir()
    (bad / "meta.json").write_bytes((src / "meta.json").read_bytes())
    (bad / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    meta = checkpoint.read_meta(src)
    model = HybridLM(ModelConfig(**meta["config"]["model"]), meta["architecture"]["vocab_size"])
    with pytest.raises(UserError, match="model.safetensors is corrupted: its sha256 differs"):
        checkpoint.load(bad, model)
    (bad / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))  # before checksums
    with pytest.raises(UserError, match="truncated or corrupted"):
        checkpoint.load(bad, model)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json"):
        checkpoint.load(bad, model)
    assert checkpoint.read_meta(src)["step"] == 6  # the real checkpoint is untouched


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridchat.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_gpu_preset_without_cuda_stops_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("model=hybrid_d20", "gpu=rtx4090", f"paths.outputs={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and "needs a CUDA device" in lines[-1] and "gpu=cpu" in lines[-1]


def test_cfg_job_prints_the_resolved_config():
    result = cli("--cfg", "job", "model=mamba_tiny")
    assert result.returncode == 0
    assert "name: mamba_tiny" in result.stdout and "block_pattern: all_mamba" in result.stdout


def test_multirun_makes_one_folder_per_job(tmp_path):
    result = cli("-m", "model=transformer_tiny,mamba_tiny,hybrid_tiny", "debug=smoke", f"paths.outputs={tmp_path}",
                 "stage.num_steps=2", env={"HYBRIDCHAT_RUN_DIR": str(tmp_path / "sweep")}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job in jobs:
        assert (job / "metrics.jsonl").exists() and (job / "metrics.png").exists()
    ckpts = sorted(str(p.parent.parent.relative_to(tmp_path / "checkpoints"))
                   for p in (tmp_path / "checkpoints").rglob("step_000002"))
    assert ckpts == [f"{m}/debug=smoke,model={m},stage.num_steps=2" for m in ("hybrid_tiny", "mamba_tiny",
                                                                                "transformer_tiny")]


def test_torchrun_two_cpu_processes_agree(tmp_path):
    """Plain torchrun (no launcher script): both ranks still land in one run folder."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "hybridchat.train", "debug=smoke", "stage.num_steps=3", f"paths.outputs={tmp_path}", "run_name=ddp",
         "stage.total_batch_tokens=4096"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "HYBRIDCHAT_RUN_DIR"}, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-8000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("torchrun-")
    run_dir = run_dirs[0]
    logs = {p.name: p.read_text() for p in run_dir.glob("train*.log")}
    assert set(logs) == {"train.log", "train_rank1.log"}
    checksums = [line.rsplit(" ", 1)[-1] for text in logs.values() for line in text.splitlines()
                 if "final parameter checksum" in line]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (run_dir / ".hydra").is_dir() and (run_dir / ".hydra_rank1").is_dir()
    assert len(list((tmp_path / "checkpoints" / "ddp" / "pretrain").glob("step_*"))) >= 1
    assert len(read_metrics(run_dir)) > 0 and not (run_dir / "metrics_rank1.jsonl").exists()
    # The validation set does not depend on the number of ranks: before any step (same seed, same
    # weights) one process measures the bits per byte the two ranks measured together.
    single = tmp_path / "single"
    train(["debug=smoke", "stage.num_steps=1", f"paths.outputs={single}", "run_name=one",
           "stage.total_batch_tokens=4096"], single / "run")
    assert read_metrics(single / "run")[0]["val/bpb"] == pytest.approx(read_metrics(run_dir)[0]["val/bpb"], rel=1e-5)


def test_submitit_launcher_sweeps_two_jobs_of_two_ddp_tasks(tmp_path):
    """The SLURM path (hydra/launcher=slurm) minus the queue: submitit's local executor, a 2-job sweep
    whose jobs each run 2 tasks as one DDP job."""
    result = cli("-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "debug=smoke",
                 f"paths.outputs={tmp_path}", "stage.num_steps=1,2", "stage.total_batch_tokens=2048",
                 env={"HYBRIDCHAT_RUN_DIR": str(tmp_path / "sweep"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    for number, steps in (("0", 1), ("1", 2)):
        job = tmp_path / "sweep" / number
        logs = {p.name: p.read_text() for p in job.glob("train*.log")}
        assert set(logs) == {"train.log", "train_rank1.log"}
        checksums = {line.rsplit(" ", 1)[-1] for text in logs.values() for line in text.splitlines()
                     if "final parameter checksum" in line}
        assert len(checksums) == 1
        assert "world size 2" in logs["train.log"]
        assert read_metrics(job)[-1]["step"] == steps
        # Each job its own checkpoint folder (run_name from the job's overrides).
        assert (tmp_path / "checkpoints" / "hybrid_tiny" / f"debug=smoke,stage.num_steps={steps},stage.total_batch_tokens=2048"
                / "pretrain" / f"step_{steps:06d}").is_dir()


def test_checkpoint_loads_into_the_same_architecture_named_or_inline(tmp_path):
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, block_pattern="all_attention", sequence_len=16)
    model = HybridLM(cfg, vocab_size=100)
    model.init_weights()
    path = checkpoint.save(tmp_path, 1, model, [], {}, keep=1, tokenizer=Tokenizer.train(["some text"], 300))
    same = HybridLM(dataclasses.replace(cfg, block_pattern="AA"), vocab_size=100)  # same layers, inline
    checkpoint.load(path, same)
    for (name, a), b in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="vocab_size"):
        checkpoint.load(path, HybridLM(cfg, vocab_size=101))
    with pytest.raises(UserError, match="n_embd"):
        checkpoint.load(path, HybridLM(dataclasses.replace(cfg, n_embd=32, n_head=2), vocab_size=100))


def test_pretrain_on_your_own_jsonl_files(tmp_path):
    """data=text: a user's JSONL corpus trains end to end (tokenizer, packing, validation split)."""
    from hybridchat.data.sources import world_source
    from hybridchat.data.world import World, WorldConfig

    texts = list(world_source(World.generate(WorldConfig(n_people=60)))("train", 0))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part1.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:150]))
    (corpus / "part2.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[150:]))
    final_bpb = train(["debug=smoke", "data=text", f"data.path={corpus}", "data.text_key=body",
                       "data.val_fraction=0.1", "data.tokenizer_vocab_size=512", f"paths.outputs={tmp_path}",
                       "run_name=own"], tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert records[0]["val/bpb"] > final_bpb > 0
    assert checkpoint.latest(tmp_path / "checkpoints" / "own" / "pretrain") is not None


def test_lr_schedule_warms_up_holds_and_warms_down_to_final_fraction(smoke_run):
    """Hand values of the schedule, and the loop applying it: smoke has 6 steps, 2 of warmup and
    round(0.3 * 6) = 2 of warmdown to 5%."""
    s = StageConfig(num_steps=10, warmup_steps=2, warmdown_ratio=0.3, final_lr_frac=0.1)
    assert [round(lr_multiplier(i, s), 6) for i in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 1, 0.7, 0.4]
    out, _, _ = smoke_run
    logged = [r["train/lr_mult"] for r in read_metrics(out / "run") if "train/lr_mult" in r]
    assert logged == pytest.approx([0.5, 1, 1, 1, 1, 0.525])


def test_bits_per_byte_is_nats_over_ln2_per_utf8_byte(smoke_run):
    """evaluate_bpb against a hand computation on ASCII text: cross-entropy summed over the target
    tokens (nats), divided by ln 2 and by the text's byte count."""
    import math

    import torch.nn.functional as F

    from hybridchat.training.stages import evaluate_bpb

    out, _, _ = smoke_run
    run = load_run(checkpoint.latest(out / "checkpoints" / "smoke" / "pretrain"))
    model, tok = run.model, run.tokenizer
    text = "Settlers founded the city of Vellport in 1203."
    ids = [tok.bos_id] + tok.encode(text)
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        nats = F.cross_entropy(model(inputs)[0].double(), targets[0], reduction="sum").item()
    ctx = RunContext(None, Runtime(torch.device("cpu"), None), model)
    ctx.tokenizer = tok
    bpb = evaluate_bpb(model, [{"inputs": inputs, "targets": targets}], ctx)
    assert bpb == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-5)


def test_gradients_are_clipped_at_stage_grad_clip_and_old_checkpoints_pruned(tmp_path, monkeypatch):
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((max_norm, float(norm), float(after)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    train(["debug=smoke", f"paths.outputs={tmp_path}", "run_name=clip", "stage.grad_clip=0.01",
           "stage.checkpoint_every=1", "stage.keep_checkpoints=2"], tmp_path / "run")
    assert len(seen) == 6 and all(m == 0.01 and before > 0.01 and after <= 0.01 * 1.001 for m, before, after in seen)
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / "clip" / "pretrain").iterdir())
    assert kept == ["step_000005", "step_000006"]


def test_grad_accum_steps_is_batch_tokens_over_rows_times_length_times_ranks():
    """Hand values: 4 rows x 256 tokens x 3 ranks = 3072 tokens per pass; zero, negative or ragged
    totals are one UserError naming the keys and the product."""
    from hybridchat.infra.runtime import grad_accum_steps

    assert grad_accum_steps(5 * 3072, 4, 256, 3) == 5
    assert grad_accum_steps(3072, 4, 256, 3) == 1
    assert grad_accum_steps(None, 4, 256, 3) == 1
    assert grad_accum_steps(1, 1, 1, 1) == 1  # one token per pass: a total of 1 is one pass
    for bad in (0, -3072, 3072 + 256, 1000):
        with pytest.raises(UserError) as e:
            grad_accum_steps(bad, 4, 256, 3)
        assert str(e.value) == (f"stage.total_batch_tokens={bad} must be a positive multiple of gpu.micro_batch x "
                                f"model.sequence_len x world_size = 4 x 256 x 3 = 3072")


def test_lr_schedule_edges_no_warmup_and_a_warmdown_of_under_one_step():
    """Hand values: without warmup the first step runs at the full lr; a warmdown_ratio that rounds
    to zero steps still ends at final_lr_frac only through max(1, ...): one step of warmdown, which
    is the step past the last (the schedule is 1.0 on every step that runs)."""
    from hybridchat.infra.config import StageConfig
    from hybridchat.training.stages import lr_multiplier

    s = StageConfig(num_steps=10, warmup_steps=0, warmdown_ratio=0.04, final_lr_frac=0.1)
    assert [lr_multiplier(i, s) for i in range(10)] == [1.0] * 10
    assert lr_multiplier(10, s) == pytest.approx(0.1)
    s = StageConfig(num_steps=8, warmup_steps=4, warmdown_ratio=0.5, final_lr_frac=0.0)
    assert [lr_multiplier(i, s) for i in range(8)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25])
