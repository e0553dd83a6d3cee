"""stage=distill: attention layers turned into Mamba-2 layers from their weights, then distilled.

The mapping is checked by hand (rows of in_proj against Q/K/V, GQA included), the converted layer
against a plain linear-attention loop, and the stage end to end through Hydra, bad students included.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_VOCAB, compose_config

from hybridchat.core.errors import UserError
from hybridchat.infra import checkpoint
from hybridchat.model.attention import CausalSelfAttention
from hybridchat.model.config import ModelConfig
from hybridchat.model.convert import attention_to_mamba, convert
from hybridchat.model.lm import HybridLM
from hybridchat.model.mamba import Mamba2
from hybridchat.train import run
from hybridchat.training.runs import load_run
from hybridchat.training.stages.distill import aligned_error, block_io, hidden_error, token_kl

# One xdist worker for the whole file (make test's --dist loadgroup): its module fixture distils a student once for
# the file.
pytestmark = pytest.mark.xdist_group("distill")

ROOT = Path(__file__).resolve().parents[1]
D, N_HEAD, N_KV, HD = 64, 4, 2, 16  # GQA: query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1
STUDENT_MAMBA = {"expand": 1, "headdim": HD, "d_state": HD, "ngroups": N_HEAD}


def tiny(pattern: str, **mamba) -> HybridLM:
    cfg = ModelConfig(n_layer=4, n_embd=D, n_head=N_HEAD, n_kv_head=N_KV, block_pattern=pattern, chunk_size=8,
                      sequence_len=32, **mamba)
    return HybridLM(cfg, vocab_size=97)


def random_teacher() -> HybridLM:
    # Every weight random: the init zeroes the output projections, which would make "O copied" vacuous.
    torch.manual_seed(0)
    teacher = tiny("AAAA", **STUDENT_MAMBA)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.2)
    return teacher


def test_zero_output_student_is_the_teacher_without_the_converted_attention():
    """copy_output=False: the converted layers add nothing, so the student computes what the teacher
    computes with those layers' attention output projections zeroed; in_proj still holds Q, K, V."""
    teacher = random_teacher()
    student = tiny("AMAM", **STUDENT_MAMBA)
    student.init_weights()
    convert(teacher, student, copy_output=False)
    for i in (1, 3):
        assert not student.blocks[i].mixer.out_proj.weight.any()
        assert torch.equal(student.blocks[i].mixer.in_proj.weight[192:256], teacher.blocks[i].mixer.c_q.weight)
    ablated = tiny("AAAA", **STUDENT_MAMBA)
    ablated.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for i in (1, 3):
            ablated.blocks[i].mixer.c_proj.weight.zero_()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(student(tokens), ablated(tokens), rtol=0, atol=1e-6)
        assert not torch.allclose(student(tokens), teacher(tokens), atol=1e-3)  # the ablation matters


def test_converted_layers_hold_q_k_v_o_and_the_rest_is_copied():
    teacher = random_teacher()
    student = tiny("AMAM", **STUDENT_MAMBA)
    student.init_weights()
    convert(teacher, student)
    # in_proj rows: z [0, 64), x [64, 128), B [128, 192), C [192, 256), dt [256, 260); 16 rows a head.
    for i in (1, 3):
        attn, mamba = teacher.blocks[i].mixer, student.blocks[i].mixer
        rows = mamba.in_proj.weight
        for h in range(N_HEAD):
            kv = h // 2
            head, kv_head = slice(16 * h, 16 * h + 16), slice(16 * kv, 16 * kv + 16)
            assert torch.equal(rows[64 + 16 * h:80 + 16 * h], attn.c_v.weight[kv_head]), (i, h, "x <- V")
            assert torch.equal(rows[128 + 16 * h:144 + 16 * h], attn.c_k.weight[kv_head]), (i, h, "B <- K")
            assert torch.equal(rows[192 + 16 * h:208 + 16 * h], attn.c_q.weight[head]), (i, h, "C <- Q")
        assert torch.equal(mamba.out_proj.weight, attn.c_proj.weight)
        taps = torch.zeros_like(mamba.conv1d.weight)
        taps[:, 0, -1] = 1
        assert torch.equal(mamba.conv1d.weight, taps) and not mamba.conv1d.bias.any()
    converted = ("blocks.1.mixer.", "blocks.3.mixer.")
    s_state = student.state_dict()
    for key, value in teacher.state_dict().items():
        if not key.startswith(converted):
            assert torch.equal(s_state[key], value), key
    # A student with the teacher's own pattern is the teacher.
    same = tiny("AAAA", **STUDENT_MAMBA)
    convert(teacher, same)
    tokens = torch.randint(0, 97, (2, 16))
    assert torch.equal(same(tokens), teacher(tokens))


class PassThrough(nn.Module):
    def forward(self, y, z):
        return y


def test_converted_layer_is_linear_attention_over_the_copied_projections():
    """With no decay (A = 0), dt = 1, no skip (D = 0) and the gated norm bypassed, the converted
    layer's output at t is O(sum_{s<=t} (phi(q_t) . phi(k_s)) phi(v_s)), phi = SiLU (the identity
    conv passes the projections through to the SiLU that follows it)."""
    torch.manual_seed(1)
    attn = CausalSelfAttention(D, N_HEAD, N_KV)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    mamba = Mamba2(D, d_state=HD, expand=1, headdim=HD, ngroups=N_HEAD, chunk_size=8, backend="torch")
    attention_to_mamba(attn, mamba)
    with torch.no_grad():
        mamba.A_log.fill_(-math.inf)
        mamba.in_proj.weight[-N_HEAD:].zero_()
        mamba.dt_bias.fill_(math.log(math.e - 1))  # softplus^-1(1)
        mamba.D.zero_()
    mamba.norm = PassThrough()

    u = torch.randn(2, 20, D)  # 20 tokens: two and a half scan chunks
    with torch.no_grad():
        out = mamba(u)
        q = F.silu(attn.c_q(u)).view(2, 20, N_HEAD, HD)
        k = F.silu(attn.c_k(u)).view(2, 20, N_KV, HD)
        v = F.silu(attn.c_v(u)).view(2, 20, N_KV, HD)
        y = torch.zeros(2, 20, N_HEAD, HD)
        for b in range(2):
            for t in range(20):
                for h in range(N_HEAD):
                    kv = h * N_KV // N_HEAD
                    for s in range(t + 1):
                        y[b, t, h] += torch.dot(q[b, t, h], k[b, s, kv]) * v[b, s, kv]
        expected = attn.c_proj(y.reshape(2, 20, D))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_token_kl_is_teacher_to_student_at_the_temperature():
    student, teacher = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p_s, p_t = F.softmax(student / 2, -1), F.softmax(teacher / 2, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1)
    torch.testing.assert_close(token_kl(student, teacher, 2.0), expected)
    assert token_kl(teacher, teacher, 1.0).abs().max() < 1e-6


def test_hidden_error_is_relative_squared_error_over_masked_positions_averaged_over_layers():
    teacher = {1: torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]), 3: torch.tensor([[[0.0, 2.0], [5.0, 5.0]]])}
    student = {1: torch.tensor([[[3.0, 0.0], [9.0, 9.0]]]), 3: torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])}
    mask = torch.tensor([[True, False]])  # the second position is padding: its huge errors do not count
    # layer 1: (0 + 16) / (9 + 16); layer 3: (1 + 0) / (0 + 4)
    assert hidden_error(student, teacher, mask).item() == pytest.approx((16 / 25 + 1 / 4) / 2)
    assert hidden_error(teacher, teacher, torch.tensor([[True, True]])).item() == 0


def test_block_io_records_the_hidden_states_entering_and_leaving_each_layer():
    """Against a plain loop over the blocks; the hooks are gone afterwards."""
    torch.manual_seed(0)
    model = tiny("AMAM")
    with torch.no_grad():  # all random: the init's zero output projections make every block the identity
        for p in model.parameters():
            p.normal_(0, 0.2)
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad(), block_io(model, [1, 2]) as recorded:
        model(idx)
    x = model.norm_embed(model.wte(idx))
    rope = model._rope(0, 12, idx.device)
    hidden = [x]
    with torch.no_grad():
        for block in model.blocks:
            hidden.append(block(hidden[-1], rope))
    assert sorted(recorded) == [1, 2]
    for i in (1, 2):
        torch.testing.assert_close(recorded[i][0], hidden[i])
        torch.testing.assert_close(recorded[i][1], hidden[i + 1])
    assert all(not block._forward_hooks for block in model.blocks)


def test_aligned_error_runs_each_converted_layer_on_the_teachers_input():
    """The student layer's own input is never used: its error is against the teacher layer's output
    on the teacher's input, computed here by hand for a student that differs only in layer 1."""
    teacher = random_teacher()
    student = tiny("AMAA", **STUDENT_MAMBA)
    convert(teacher, student)
    with torch.no_grad():
        student.blocks[0].mlp.c_proj.weight.add_(1.0)  # the student's own input to layer 1 is now far off
    idx = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad(), block_io(teacher, [1]) as teacher_io:
        teacher(idx)
    x = teacher.norm_embed(teacher.wte(idx))
    x = teacher.blocks[0](x, teacher._rope(0, 12, idx.device))
    target = teacher.blocks[1](x, teacher._rope(0, 12, idx.device))
    out = student.blocks[1](x, None)
    expected = (out - target).square().sum() / target.square().sum()
    with torch.no_grad():
        torch.testing.assert_close(aligned_error(student, teacher_io, mask), expected.detach())


# --- end to end through Hydra ---------------------------------------------------------------------

SMOKE = ["debug=smoke", "model=transformer_tiny", "run_name=distill"]
# debug=smoke: n_embd 64, 2 heads of 32, 1 KV head.
STUDENT = ["stage=distill", "model.expand=1", "model.headdim=32", "model.d_state=32", "model.ngroups=2"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A 24-step all-attention teacher (so its attention matters), then 9 distillation steps into AM."""
    out = tmp_path_factory.mktemp("distill")
    common = SMOKE + [f"paths.outputs={out}"]
    run(compose_config(common + ["stage.num_steps=24", "stage.eval_every=12"], output_dir=out / "teacher"))
    for name, extra in (("student", []), ("student_hidden", ["run_name=distill_hidden", "stage.hidden_weight=4"]),
                        ("student_zero", ["run_name=distill_zero", "stage.converted_output=zero"])):
        run(compose_config(common + STUDENT + ["model.block_pattern=AM", "stage.num_steps=9", "stage.eval_every=3",
                                               "stage.source=${paths.checkpoints}/distill/pretrain", *extra],
                           output_dir=out / name))
    return out


def test_distill_run_lowers_the_kl_and_writes_the_student(distilled):
    teacher_bpb = [r["val/bpb"] for r in metrics(distilled / "teacher") if "val/bpb" in r][-1]
    records = metrics(distilled / "student")
    evals = [r for r in records if "val/kl" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 9]
    kl = [r["val/kl"] for r in evals]
    assert all(math.isfinite(x) and x >= 0 for x in kl)
    assert kl[0] < 0.1, "the student did not start from the teacher's weights"
    assert kl[-1] < kl[0], kl
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert all(math.isfinite(r["val/bpb"]) for r in evals)
    assert all(r["val/teacher_bpb"] == pytest.approx(teacher_bpb) for r in evals)  # same val batches
    ckpt = checkpoint.latest(distilled / "checkpoints" / "distill" / "distill")
    assert ckpt is not None and ckpt.name == "step_000009"
    run = load_run(ckpt)
    student, meta = run.model, run.meta
    assert student.pattern == "AM" and meta["stage"] == "distill"


def test_converted_output_zero_starts_from_the_teacher_without_the_layers_attention(distilled):
    """The same teacher and student with out_proj = 0: another starting KL (the converted layer adds
    nothing instead of the copied linear attention), lowered by training like the paper's start."""
    kl = {name: [r["val/kl"] for r in metrics(distilled / name) if "val/kl" in r] for name in ("student", "student_zero")}
    assert kl["student_zero"][0] != pytest.approx(kl["student"][0], rel=1e-3), kl
    assert kl["student_zero"][-1] < kl["student_zero"][0], kl


def test_hidden_weight_adds_the_converted_layers_error_and_lowers_it(distilled):
    """KL alone and KL + 4 x hidden_error from the same teacher: the term is logged, counted in the
    loss, and distilling on it brings the converted layer's hidden states closer than the KL alone."""
    plain, hidden = metrics(distilled / "student"), metrics(distilled / "student_hidden")
    first = next(r for r in hidden if "train/hidden_error" in r)
    assert first["train/loss"] == pytest.approx(first["train/kl"] + 4 * first["train/hidden_error"], rel=1e-5)
    assert not any("train/hidden_error" in r for r in plain)
    assert all(r["train/loss"] == pytest.approx(r["train/kl"], rel=1e-5) for r in plain if "train/kl" in r)
    error = {name: [r["val/hidden_error"] for r in records if "val/hidden_error" in r]
             for name, records in (("plain", plain), ("hidden", hidden))}
    assert error["plain"][0] == pytest.approx(error["hidden"][0])  # same start: the converted teacher
    assert error["hidden"][-1] < error["hidden"][0]
    assert error["hidden"][-1] < error["plain"][-1], error


def test_student_of_other_sizes_or_mamba_settings_is_refused(distilled):
    common = SMOKE + STUDENT + [f"paths.outputs={distilled}", "model.block_pattern=AM", "overwrite=true"]
    with pytest.raises(UserError, match=r"model\.n_layer=4 \(teacher: 2\)"):
        run(compose_config(common + ["model.n_layer=4"], output_dir=distilled / "bad"))
    needed = "model.expand=1 model.headdim=32 model.d_state=32 model.ngroups=2"
    with pytest.raises(UserError, match=f"layer 1: .* only with {needed} \\(the student has expand=2"):
        run(compose_config(SMOKE + ["stage=distill", f"paths.outputs={distilled}", "model.block_pattern=AM", "overwrite=true"],
                           output_dir=distilled / "bad"))


def test_mamba_back_to_attention_stops_with_one_error_line(distilled):
    """From the distilled AM student as teacher, AA would turn Mamba back into attention."""
    result = subprocess.run(
        [sys.executable, "-m", "hybridchat.train", *SMOKE, *STUDENT, f"paths.outputs={distilled}",
         "model.block_pattern=AA", "stage.source=distill", "overwrite=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert lines[-1].startswith("error: model.block_pattern gives AA but the teacher is AM: layer(s) [1] are Mamba")


# ---- conversion errors ---------------------------------------------------------------------------

def conv_lm(pattern: str, **overrides) -> HybridLM:
    """32 channels in 2 attention heads of 16; Mamba sized to hold them (expand 1, heads of 16, d_state 16,
    one group per head)."""
    cfg = dict(n_layer=len(pattern), n_embd=32, n_head=2, n_kv_head=1, block_pattern=pattern, mlp_ratio=2,
               expand=1, headdim=16, d_state=16, ngroups=2, chunk_size=4)
    cfg.update(overrides)
    return HybridLM(ModelConfig(**cfg), vocab_size=TINY_VOCAB)


def test_conversion_refuses_other_sizes_listing_each_difference():
    with pytest.raises(UserError) as e:
        convert(conv_lm("AA"), conv_lm("AM", mlp_ratio=3, qk_norm=False))
    assert str(e.value) == ("the student must have the teacher's sizes except its block pattern: "
                            "model.mlp_ratio=3 (teacher: 2); model.qk_norm=False (teacher: True)")
    # Mamba settings are compared only when the teacher has Mamba layers (here it has: layer 1).
    with pytest.raises(UserError) as e:
        convert(conv_lm("AM"), conv_lm("MM", d_conv=3))
    assert str(e.value) == ("the student must have the teacher's sizes except its block pattern: "
                            "model.d_conv=3 (teacher: 4)")
    convert(conv_lm("AA", d_conv=3), conv_lm("AM"))  # an all-attention teacher has no d_conv to compare


def test_conversion_refuses_mamba_back_to_attention_naming_the_layers():
    with pytest.raises(UserError) as e:
        convert(conv_lm("AMAM"), conv_lm("MAAM"))
    assert str(e.value) == ("model.block_pattern gives MAAM but the teacher is AMAM: layer(s) [1] are Mamba in "
                            "the teacher and attention in the student; distillation turns A into M only")


def test_attention_fits_a_mamba_layer_only_with_one_head_per_head_of_its_size():
    from hybridchat.model.attention import CausalSelfAttention
    from hybridchat.model.convert import attention_to_mamba
    from hybridchat.model.mamba import Mamba2

    attn = CausalSelfAttention(32, 2, 1)
    with pytest.raises(UserError) as e:
        attention_to_mamba(attn, Mamba2(32, d_state=8, expand=2, headdim=16, ngroups=1, layer_idx=3, backend="torch"))
    assert str(e.value) == ("layer 3: a Mamba layer holds attention with 2 heads of 16 only with model.expand=1 "
                            "model.headdim=16 model.d_state=16 model.ngroups=2 (the student has expand=2 d_state=8 "
                            "ngroups=1)")
    attention_to_mamba(attn, Mamba2(32, d_state=16, expand=1, headdim=16, ngroups=2, backend="torch"))
