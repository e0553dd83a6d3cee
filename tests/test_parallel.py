"""Ranks: DDP and FSDP with 2 gloo processes train as one process does at the same global batch; an
FSDP checkpoint is a one-process checkpoint (loads, resumes anywhere); activation checkpointing
recomputes without changing a number."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file

from hybridchat.infra import checkpoint
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.train import run
from hybridchat.training.runs import load_run

# One xdist worker for the whole file (make test's --dist loadgroup): its module fixtures run torchrun (2 gloo ranks)
# once for the file.
pytestmark = pytest.mark.xdist_group("parallel")

ROOT = Path(__file__).resolve().parents[1]
# Smoke rows are 4 x 256 tokens: one process runs 4 micro-batches a step, two run 2 each, and the
# loader deals global batches round-robin, so every step sees the same 16 rows either way (and the
# 2-process runs exercise the no-sync micro-batch).
COMMON = ["debug=smoke", "stage.total_batch_tokens=4096"]
# Ranks sum in another order than one process (and Muon orthogonalises sharded matrices): close, not equal.
ACROSS_LAYOUTS = {"rel": 5e-4, "abs": 1e-4}  # measured: FSDP within 4e-5 (relative) over 6 steps


def curve(run_dir: Path) -> dict[tuple[int, str], float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in records for k, v in r.items() if k in ("train/loss", "val/bpb")}


def assert_same_curve(got: dict, want: dict, **tolerance) -> None:
    assert got and set(got) <= set(want), sorted(set(got) - set(want))
    for key, value in got.items():
        assert value == pytest.approx(want[key], **tolerance), key


def one_process(out: Path, name: str, *overrides: str) -> Path:
    run(compose_config(COMMON + [f"paths.outputs={out}", f"run_name={name}", *overrides], output_dir=out / name))
    return out / name


def two_processes(out: Path, name: str, *overrides: str) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridchat.train",
         *COMMON, f"paths.outputs={out}", f"run_name={name}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYBRIDCHAT_RUN_DIR": str(out / name), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-8000:]
    return out / name


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_run(path).model.state_dict()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def single(out):
    return one_process(out, "single")


@pytest.fixture(scope="module")
def fsdp(out):
    return two_processes(out, "fsdp", "distributed.strategy=fsdp")


def test_ddp_two_processes_follow_the_one_process_curve(out, single):
    ddp = two_processes(out, "ddp", "distributed.strategy=ddp")
    assert_same_curve(curve(ddp), curve(single), **ACROSS_LAYOUTS)


def test_fsdp_two_processes_follow_the_one_process_curve_and_save_a_one_process_checkpoint(out, single, fsdp):
    assert_same_curve(curve(fsdp), curve(single), **ACROSS_LAYOUTS)
    assert "world size 2" in (fsdp / "train.log").read_text()
    sharded, whole = (checkpoint.stage_dir(out / "checkpoints", name, "pretrain") / "step_000006"
                      for name in ("fsdp", "single"))
    got, want = weights(sharded), weights(whole)
    assert list(got) == list(want)
    # What rank 0 wrote is what the ranks trained: the checksum they logged of their gathered weights.
    logged = [float(line.rsplit(" ", 1)[-1]) for line in (fsdp / "train.log").read_text().splitlines()
              if "final parameter checksum" in line]
    assert logged == [pytest.approx(float(sum(t.double().sum() for t in got.values())), rel=1e-9)]
    # Six steps apart the layouts drift by ~3e-3 (DDP as much: bf16 Newton-Schulz, Adam's tiny eps);
    # a shard gathered into the wrong rows would be off by the weights' own size (~0.25).
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-2, msg=name)
    # The optimizer file holds full tensors under the one-process names (Muon's momentum, AdamW's moments).
    got, want = (load_file(str(p / "optimizer.safetensors")) for p in (sharded, whole))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


def test_fsdp_resumes_its_checkpoint_and_one_process_resumes_it_too(out, single, fsdp):
    step3 = checkpoint.stage_dir(out / "checkpoints", "fsdp", "pretrain") / "step_000003"
    for name in ("fsdp_resumed", "one_resumed"):
        shutil.copytree(step3, checkpoint.stage_dir(out / "checkpoints", name, "pretrain") / step3.name)
    straight = curve(fsdp)
    # With activation checkpointing on as well: recomputing changes no number, also inside FSDP's hooks.
    resumed = curve(two_processes(out, "fsdp_resumed", "distributed.strategy=fsdp", "resume=true",
                                  "gpu.activation_checkpointing=true"))
    assert {step for step, _ in resumed} == {3, 4, 5, 6}
    assert_same_curve(resumed, straight, rel=1e-5, abs=1e-6)  # the same layout: the same numbers
    # Model and optimizer state went through full tensors: one process continues the run as well. Its
    # first evaluation (step 3, before training) scores exactly the weights the FSDP run had.
    one = curve(one_process(out, "one_resumed", "resume=true"))
    assert one[(3, "val/bpb")] == pytest.approx(straight[(3, "val/bpb")], rel=1e-9)
    assert_same_curve(one, curve(single), **ACROSS_LAYOUTS)


def test_activation_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients():
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, block_pattern="AM", mamba_mlp=True, d_state=16,
                      headdim=16, chunk_size=8, sequence_len=32)
    torch.manual_seed(0)
    model = HybridLM(cfg, vocab_size=97)
    model.init_weights()
    tokens = torch.randint(0, 97, (3, 33))
    calls = {kind: 0 for kind in model.pattern}
    for block in model.blocks:  # a pre-hook: the recompute stops once it has what backward needs
        block.register_forward_pre_hook(lambda m, args: calls.__setitem__(m.kind, calls[m.kind] + 1))

    def loss_and_grads(recompute: bool):
        model.activation_checkpointing = recompute
        model.zero_grad(set_to_none=True)
        calls.update({kind: 0 for kind in calls})
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, dict(calls)

    plain_loss, plain_grads, plain_calls = loss_and_grads(False)
    loss, grads, recomputed_calls = loss_and_grads(True)
    assert plain_calls == {"A": 1, "M": 1} and recomputed_calls == {"A": 2, "M": 2}  # forward, then again in backward
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    model.eval()  # evaluation and generation keep the plain path: nothing to recompute without backward
    calls.update({kind: 0 for kind in calls})
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert calls == {"A": 1, "M": 1}
