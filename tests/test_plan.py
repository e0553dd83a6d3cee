"""The memory planner: its estimate against measured peak memory, `auto` micro-batches, presets."""

import json
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from torch.distributed._tools.mem_tracker import MemTracker

from hybridchat import plan
from hybridchat.core.errors import UserError, run_or_exit
from hybridchat.infra import parallel
from hybridchat.infra import planner as planning
from hybridchat.infra.build import build_model
from hybridchat.train import typed_config
from hybridchat.training.loop import build_optimizers
from tests.conftest import CONF_DIR, compose_config, group_options

GIB = 2**30


def plan_config(overrides, output_dir=None):
    """Compose conf/plan.yaml like `python -m hybridchat.plan <overrides>`, HydraConfig set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("plan", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def measured_peak(config, micro_batch: int, checkpointing: bool = False) -> dict[str, int]:
    """Peak bytes of live tensors over one steady-state training step (the optimizer state exists,
    as from the second step on), counted by torch's MemTracker (the CPU's max_memory_allocated), by
    kind: Total, Parameter, Optstate, Activation, Temp, ... The forward runs under the CPU's autocast
    to gpu.dtype (bfloat16: as on a GPU, the matmuls' weight copies are cached until backward), with
    activation checkpointing if asked."""
    torch.manual_seed(0)
    vocab = planning.vocab_size_of(config.model, config.data)
    model = build_model(config.model, vocab)
    model.init_weights()
    model.train().activation_checkpointing = checkpointing
    optimizers = build_optimizers(model, config.stage)
    tokens = torch.randint(0, vocab, (micro_batch, config.model.sequence_len + 1))
    dtype = getattr(torch, config.gpu.dtype.value)
    training_step(model, model, optimizers, tokens, dtype)
    tracker = MemTracker()
    tracker.track_external(model, *optimizers)
    with tracker:
        training_step(model, model, optimizers, tokens, dtype)
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {getattr(kind, "value", kind): n for kind, n in snapshot.items()}


def training_step(train_model, model, optimizers, tokens: torch.Tensor, dtype: torch.dtype,
                  micro_batches: int = 1) -> None:
    """One step as the loop takes it: micro_batches forwards (train_model: the model, or its DDP/FSDP
    wrapper) under the CPU's autocast to dtype (off at float32) and backwards, the gradients synced
    at the last, clipping, every optimizer."""
    for micro in range(micro_batches):
        with parallel.gradient_sync(train_model, micro == micro_batches - 1):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = train_model(tokens[:, :-1], tokens[:, 1:])
            (loss / micro_batches).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


@pytest.fixture
def one_thread():
    """One thread: on a busy 2-core machine a second one mostly spins (5x the CPU time here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model", ["hybrid_tiny", "transformer_tiny", "mamba_tiny"])
def test_estimate_is_within_25_percent_of_measured_peak_on_cpu(model, one_thread):
    config, _ = typed_config(compose_config([f"model={model}"]))
    estimate = planning.make_planner(config, 64 * GIB, ssm_kernels=False).memory(planning.Setup(1, "ddp", 2, False))
    measured = measured_peak(config, micro_batch=2)
    for what, ours, theirs, tolerance in [
            ("total", estimate.tensors, measured["Total"], 0.25),
            # Each term on its own too: the total alone would hide a missing optimizer or logits term.
            ("weights", estimate.weights, measured["Parameter"], 0.01),
            ("optimizer", estimate.optimizer, measured["Optstate"], 0.01),
            ("activations", estimate.activations, measured["Activation"] + measured["Temp"], 0.05)]:
        error = (ours - theirs) / theirs
        assert abs(error) < tolerance, f"{model} {what}: estimate {ours / 2**20:.1f} MiB, measured " \
                                       f"{theirs / 2**20:.1f} MiB ({error:+.1%})"


@pytest.mark.parametrize("dtype, checkpointing, micro_batch, vocab", [("bfloat16", False, 1, 4096), ("float32", True, 2, 512)])
def test_autocast_copies_and_activation_checkpointing_against_measured_peak_on_cpu(dtype, checkpointing, micro_batch,
                                                                                    vocab, one_thread):
    """The bf16 terms (activations at 2 bytes, the matmul weights' autocast copies: 11% of hybrid_tiny's
    activations at one row) and checkpointing's (each block's input kept, one block recomputed at a
    time: with a 512-token vocabulary the recomputed block, not the head, sets the peak) against a
    measured step: the activations within 5% (bf16) and 10% (checkpointing: the estimate was 6% low
    at the default vocabulary, November 2026)."""
    config, _ = typed_config(compose_config(["model=hybrid_tiny", f"gpu.dtype={dtype}",
                                             f"data.tokenizer_vocab_size={vocab}"]))
    planner = planning.make_planner(config, 64 * GIB, ssm_kernels=False)
    assert planner.autocast == (dtype != "float32")
    estimate = planner.memory(planning.Setup(1, "ddp", micro_batch, checkpointing))
    measured = measured_peak(config, micro_batch=micro_batch, checkpointing=checkpointing)
    theirs = measured["Activation"] + measured["Temp"]
    error = (estimate.activations - theirs) / theirs
    assert abs(error) < (0.10 if checkpointing else 0.05), f"activations: estimate {estimate.activations / 2**20:.1f} " \
                                                          f"MiB, measured {theirs / 2**20:.1f} MiB ({error:+.1%})"
    assert abs(estimate.weights - measured["Parameter"]) / measured["Parameter"] < 0.01


@pytest.mark.parametrize("value", ["lots", 0, -3, 2.5, True])
def test_micro_batch_must_be_a_positive_int_or_auto(value):
    config, _ = typed_config(compose_config([]))
    config.gpu.micro_batch = value
    with pytest.raises(UserError, match=r"gpu\.micro_batch=.* positive integer or auto"):
        planning.resolve_micro_batch(config, 1, 8 * GIB)


def test_a_micro_batch_of_one_is_allowed_even_where_it_does_not_fit():
    """1 is the smallest positive integer: taken as given (the user's choice), and planned as given."""
    config, _ = typed_config(compose_config(["gpu.micro_batch=1"]))
    assert planning.resolve_micro_batch(config, 1, 1) == 1
    rows = planning.plan(config, [1], mfu=0.4, capacity=1, ssm_kernels=False).rows
    assert rows[0].setup.micro_batch == 1 and not rows[0].fits


def test_micro_batch_lots_is_one_error_line_from_the_planner_app(tmp_path, capsys):
    cfg = plan_config(["gpu.micro_batch=lots"], tmp_path)
    with pytest.raises(SystemExit) as e:
        run_or_exit(plan.run, cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert err.startswith("error: gpu.micro_batch='lots'") and "positive integer or auto" in err


def test_auto_is_the_largest_micro_batch_that_fits():
    config, _ = typed_config(compose_config(["gpu.micro_batch=auto"]))
    planner = planning.make_planner(config, 0, ssm_kernels=False)
    need = {m: planner.memory(planning.Setup(1, "ddp", m, False)).total for m in (4, 8)}
    assert planning.resolve_micro_batch(config, 1, need[8]) == 8
    assert planning.resolve_micro_batch(config, 1, need[8] - 1) == 4   # powers of two without total_batch_tokens
    config.stage.total_batch_tokens = 6 * config.model.sequence_len
    assert planning.resolve_micro_batch(config, 1, need[8]) == 6        # then the divisors of its rows per rank
    assert planning.resolve_micro_batch(config, 2, need[8]) == 3
    config.gpu.micro_batch = 5
    assert planning.resolve_micro_batch(config, 1, 1) == 5              # an int is the user's choice



def test_under_fsdp_a_micro_batch_that_accumulates_holds_whole_gradients_so_a_larger_one_may_fit_alone():
    """hybrid_d20 over 2 ranks at 64 tokens, 4 rows per rank and step: micro-batches of 1 and 2
    accumulate and hold whole gradients (tests/test_plan_fsdp.py measures them), 4 does not; 2 needs
    more than 4, so the largest that fits is found only by trying every candidate."""
    config, _ = typed_config(compose_config(["model=hybrid_d20", "model.sequence_len=64",
                                             "distributed.strategy=fsdp", "stage.total_batch_tokens=512"]))
    planner = planning.make_planner(config, 0, ssm_kernels=False)
    memory = {m: planner.memory(planning.Setup(2, "fsdp", m, False)) for m in (1, 2, 4)}
    sizes = planner.sizes
    assert memory[4].grads == int(4 * sizes.total / 2 + 4 * planning.fsdp_gathered(sizes, 2)[1])
    assert memory[1].grads == memory[2].grads == 4 * (sizes.total + sizes.largest_block)  # the larger here
    assert memory[1].total < memory[4].total < memory[2].total
    planner = planning.make_planner(config, memory[4].total, ssm_kernels=False)
    assert planner.max_micro_batch(planning.Setup(2, "fsdp", 1, False)) == 4


def test_nothing_fits_names_the_memory_and_what_would_fit():
    config, _ = typed_config(compose_config(["model=hybrid_d20", "gpu=rtx3070", "data=fineweb_edu"]))
    with pytest.raises(UserError) as e:
        planning.resolve_micro_batch(config, 1, 8 * GIB, ssm_kernels=True)
    message = str(e.value)
    assert message.startswith("gpu.micro_batch=auto: micro_batch=1 with 1 GPU needs")
    assert "but the device has 8.0 GiB" in message
    assert "fits: distributed.strategy=fsdp over 8 GPUs" in message
    assert "nothing fits on 1 GPU(s): use a smaller model" in message
    assert " GiB; fits: " in message and "; fits: distributed.strategy=fsdp over 8 GPUs" in message
    planner = planning.make_planner(config, 80 * GIB, ssm_kernels=True)
    setup = planning.Setup(1, "ddp", 64, False)
    assert any("gpu.activation_checkpointing=true" in a for a in planning.advice(planner, setup))


def test_memory_terms_shrink_as_they_should():
    config, _ = typed_config(compose_config(["model=hybrid_d20", "gpu=h100", "data=fineweb_edu"]))
    planner = planning.make_planner(config, 80 * GIB, ssm_kernels=True)
    one = planner.memory(planning.Setup(1, "ddp", 4, False))
    ddp = planner.memory(planning.Setup(8, "ddp", 4, False))
    fsdp = planner.memory(planning.Setup(8, "fsdp", 4, False))
    ckpt = planner.memory(planning.Setup(1, "ddp", 4, True))
    assert ddp.grads == 2 * one.grads                        # DDP's buckets
    assert fsdp.optimizer * 8 == pytest.approx(one.optimizer, rel=1e-6)
    # Not an eighth: the root (the 32k vocabulary's embedding and head, 16% of hybrid_d20) is gathered twice
    # at the first block's copy-out (planning.fsdp_gathered), with 3 blocks.
    assert fsdp.weights < 0.55 * one.weights and fsdp.grads < one.grads / 2
    assert ckpt.activations < one.activations / 2  # the head and the bf16 weight copies remain
    params = planner.sizes.params
    assert set(params) >= {"embedding", "lm_head", "attention", "mamba", "mlp"}
    assert sum(params.values()) == planner.sizes.total
    # Muon holds one buffer per block matrix, AdamW two per everything else.
    assert one.optimizer == 4 * (planner.sizes.matrix + 2 * (planner.sizes.total - planner.sizes.matrix))
    # stage.matrix_optimizer=adamw: AdamW's two buffers on every parameter
    config.stage.matrix_optimizer = "adamw"
    adamw = planning.make_planner(config, 80 * GIB, ssm_kernels=True).memory(planning.Setup(1, "ddp", 4, False))
    assert adamw.optimizer == 4 * 2 * planner.sizes.total


@pytest.mark.parametrize("gpu", [g for g in group_options("gpu") if g != "cpu"])
def test_every_gpu_preset_micro_batch_fits_the_d20_models(gpu):
    """A hand-set micro_batch must fit its card for the models it is sized for; `auto` must find one
    for them on the larger cards and say why not on the smaller ones."""
    for model in ("hybrid_d20", "transformer_d20", "mamba_d20"):
        config, _ = typed_config(compose_config([f"model={model}", f"gpu={gpu}", "data=fineweb_edu"]))
        capacity = planning.gpu_capacity(config.gpu)
        if config.gpu.micro_batch != "auto":
            planner = planning.make_planner(config, capacity, ssm_kernels=True)
            assert planner.fits(planning.Setup(1, "ddp", config.gpu.micro_batch, False)), (gpu, model)
        elif config.gpu.memory_gb >= 16:
            assert planning.resolve_micro_batch(config, 1, capacity, ssm_kernels=True) >= 1
        elif config.gpu.memory_gb <= 10:  # 6 GiB of fp32 weights, gradients and Muon/AdamW state alone
            with pytest.raises(UserError, match="fits: distributed.strategy=fsdp"):
                planning.resolve_micro_batch(config, 1, capacity, ssm_kernels=True)


def test_planner_app_prints_the_table_and_writes_plan_json(tmp_path, capsys):
    cfg = plan_config(["model=hybrid_d20", "gpu=rtx3070", "data=fineweb_edu"], tmp_path)
    result = run_or_exit(plan.run, cfg)
    out = capsys.readouterr().out
    assert "1 GPU" in out and "DDP x8" in out and "FSDP x8" in out and "does not fit" in out
    assert "MFU 40%" in out and "tok/s" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["gpu"] == "rtx3070" and len(saved["rows"]) == 3
    fsdp = next(r for r in result.rows if r.setup.strategy == "fsdp")
    assert fsdp.fits and fsdp.max_micro_batch >= 1
    assert not result.rows[0].fits


def test_tokens_per_second_follow_peak_flops_and_mfu():
    config, _ = typed_config(compose_config(["model=hybrid_d20", "gpu=h100", "data=fineweb_edu"]))
    p = planning.plan(config, [1, 8], mfu=0.5, capacity=80 * GIB, ssm_kernels=True)
    planner = planning.make_planner(config, 80 * GIB, ssm_kernels=True)
    one = p.rows[0]
    expected = 0.5 * 989e12 / planning.flops_per_token(config.model, planner.vocab_size)
    assert one.tokens_per_s == pytest.approx(expected)
    assert p.rows[1].tokens_per_s == pytest.approx(8 * expected)
    ckpt = planner.row(replace(one.setup, activation_checkpointing=True), 989.0, 0.5)
    assert ckpt.tokens_per_s == pytest.approx(expected / planning.RECOMPUTE_FACTOR)


def test_plan_config_composes_the_training_groups():
    cfg = plan_config(["model=mamba_tiny", "gpu=rtx4090", "distributed.strategy=fsdp"], "/tmp")
    assert OmegaConf.select(cfg, "gpu.micro_batch") == "auto" and cfg.distributed.strategy == "fsdp"
    assert cfg.n_gpus == [1, 8] and cfg.mfu == 0.4


def test_activation_bytes_per_token_by_hand():
    """Each term of the activation formula by hand for small sizes: d=64, 4 heads of 16 (2 KV heads:
    kv=32), Mamba d_inner 128 in 4 heads of 32, d_state 16, 1 group, chunks of 8, MLP hidden 256 (or
    96 given directly), 100 tokens, 16-token sequences, blocks A M M. A norm keeps 4 * (64 + 1) = 260."""
    from hybridchat.model.config import ModelConfig

    base = dict(n_layer=3, n_embd=64, n_head=4, n_kv_head=2, block_pattern="AMM", expand=2, headdim=32,
                d_state=16, ngroups=1, chunk_size=8, sequence_len=16, mlp_ratio=4)
    # bf16 autocast (2 bytes), mamba_ssm's kernels, relu^2 MLP, QK-norm, embedding norm, pointer.
    cfg = ModelConfig(**base, qk_norm=True, mlp="relu2", mamba_mlp=True, embed_norm=True, pointer=True)
    # attention: q, k, v inputs 3*64*2 = 384; SDPA's q, k, v 2*(64+2*32) = 256; output and c_proj input
    # 2*2*64 = 256; logsumexp 4*4 = 16; QK-norm 4*(64+32+4+2) = 408: 1320. MLP: 64*2 + 2*2*256 = 1152.
    # mamba (kernels): zxbcdt 2*128+2*16+4 = 292, conv 128+2*16 = 160: 2*(64+292+160+2*128) + 4*(4+1) = 1564.
    # Blocks: A 1320+260+1152+260 = 2992; M 1564+260+1152+260 = 3236, twice.
    # Embedding norm 260, final norm 260, head input 64*2, targets 8, 3 fp32 rows of 100: 1856.
    # Pointer: 3*64*2 inputs, 4*(2*16+1) outputs, (2*4+1) bytes per position of 16: 384+132+144 = 660.
    assert planning.activation_bytes_per_token(cfg, 100, autocast=True, ssm_kernels=True) == {
        "attention blocks": 2992, "mamba blocks": 6472, "embedding + head": 1856, "pointer": 660}

    # fp32 (4 bytes, each linear input once), our SSD, SwiGLU, no QK-norm, no embedding norm, no MLP
    # after Mamba, activation checkpointing.
    cfg = ModelConfig(**base, qk_norm=False, mlp="swiglu", mamba_mlp=False, embed_norm=False)
    # attention: 64*4 + 4*(64+64) + 2*4*64 + 16 = 1296; SwiGLU: 64*4 + 4*4*256 = 4352; A block 6168.
    # mamba (SSD): 4*(64 + 3*160 + 292 + 7*128 + 4*16 + (2*4+1)*8 + 4*32*16/8) = 4*2124 = 8496
    # and fp32 4*(2*128 + 256 + 1 + 6*4) = 2148: 10644; M block 10644 + 260 = 10904.
    # Checkpointing keeps each block's fp32 input (4*64) and recomputes the largest block.
    parts = planning.activation_bytes_per_token(cfg, 100, autocast=False, ssm_kernels=False, checkpointing=True)
    assert parts == {"attention blocks": 256, "mamba blocks": 512, "recompute": 10904,
                     "embedding + head": 260 + 256 + 8 + 1200}
    # the same without checkpointing: each block whole (the SwiGLU's 4352 in the attention block)
    parts_whole = planning.activation_bytes_per_token(cfg, 100, autocast=False, ssm_kernels=False)
    assert (parts_whole["attention blocks"], parts_whole["mamba blocks"]) == (6168, 2 * 10904)
    # 2 groups: conv 128 + 2*2*16 = 192, zxbcdt 256 + 64 + 4 = 324, 4*g*n = 128, (2*4+2)*8 = 80, and 256:
    # 4*(64 + 3*192 + 324 + 896 + 128 + 80 + 256) = 4*2324 = 9296; fp32 4*(256 + 256 + 2 + 24) = 2152;
    # M block 11448 + 260, the one recomputed
    groups = planning.activation_bytes_per_token(replace(cfg, ngroups=2), 100, autocast=False, ssm_kernels=False,
                                                 checkpointing=True)
    assert groups["recompute"] == 9296 + 2152 + 260
    # SwiGLU under bf16 autocast with mlp_ratio 1 (hidden 64): its input read by 2 linears 2*64*2 = 256, and
    # 4*2*64 = 512; the attention block 1320 + 260 + 768 + 260
    cfg1 = ModelConfig(**{**base, "mlp_ratio": 1}, qk_norm=True, mlp="swiglu", embed_norm=False)
    assert planning.activation_bytes_per_token(cfg1, 100, True, True)["attention blocks"] == 2608
    # the head's backward is over before the recompute: the smaller of the two is not added
    assert planning.peak_per_token(parts) == 256 + 512 + 10904
    assert planning.peak_per_token({"a": 5, "embedding + head": 7}) == 12
    assert planning.peak_per_token({"recompute": 9, "embedding + head": 7}) == 9

    # bf16 and our SSD: 2*2124 + 2148 = 6396; a relu^2 MLP of 96 given directly: 64*2 + 2*2*96 = 512.
    cfg = ModelConfig(**base, mlp="relu2", mlp_hidden=96, mamba_mlp=True, embed_norm=False)
    parts = planning.activation_bytes_per_token(cfg, 100, autocast=True, ssm_kernels=False)
    assert parts["mamba blocks"] == 2 * (6396 + 260 + 512 + 260)
    # no MLP at all (mlp_ratio 0): attention 1320 (QK-norm, bf16) and a norm
    cfg = ModelConfig(**{**base, "mlp_ratio": 0}, qk_norm=True)
    assert planning.activation_bytes_per_token(cfg, 100, True, True)["attention blocks"] == 1320 + 260


def test_fsdp_gathered_and_accumulated_gradients_by_hand():
    """fsdp_gathered's and fsdp_accumulated_grads' maxima by hand, each side winning once."""
    big_root = planning.Sizes(params={}, total=1000, matrix=0, matmul=0, largest_block=50, root=600, pattern="")
    big_block = replace(big_root, largest_block=300, root=100)
    # weights: root + max(root, block) + 2 blocks; grads: max(2 roots - a root shard, a root,
    # 2 blocks, less a shard of each)
    assert planning.fsdp_gathered(big_root, 2) == (600 + 600 + 100, 2 * 600 - 300)
    assert planning.fsdp_gathered(big_block, 4) == (100 + 300 + 600, 100 - 25 + 600 - 75)
    # whole gradients and a block, or the blocks' shards and 2 roots
    assert planning.fsdp_accumulated_grads(big_root, 2) == 400 / 2 + 2 * 600
    assert planning.fsdp_accumulated_grads(big_block, 2) == 1000 + 300


def test_ssm_kernels_are_assumed_or_checked_by_backend_and_device():
    gpu = planning.GPUConfig
    cfg = __import__("hybridchat.infra.config", fromlist=["x"])
    cuda, cpu = cfg.Device.cuda, cfg.Device.cpu
    assert planning.uses_ssm_kernels(gpu(ssm_backend=cfg.SSMBackend.cuda, device=cpu), check_import=True)
    assert not planning.uses_ssm_kernels(gpu(ssm_backend=cfg.SSMBackend.torch, device=cuda), check_import=False)
    assert planning.uses_ssm_kernels(gpu(ssm_backend=cfg.SSMBackend.auto, device=cuda), check_import=False)
    assert not planning.uses_ssm_kernels(gpu(ssm_backend=cfg.SSMBackend.auto, device=cpu), check_import=False)
    from hybridchat.model import mamba
    checked = planning.uses_ssm_kernels(gpu(ssm_backend=cfg.SSMBackend.auto, device=cuda), check_import=True)
    assert checked == mamba.cuda_kernels_available()


def test_device_memory_is_the_cuda_devices_own_else_the_presets(monkeypatch):
    gpu = planning.GPUConfig(memory_gb=1.5)
    assert planning.device_memory(gpu, torch.device("cpu")) == 3 * 2**29
    asked = []

    def properties(device):
        asked.append(device)
        return type("Properties", (), {"total_memory": 12345})()

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert planning.device_memory(gpu, torch.device("cuda", 1)) == 12345 and asked == [torch.device("cuda", 1)]


def test_plan_rows_hold_the_given_capacity_grad_accum_and_exact_tokens_per_second():
    config, _ = typed_config(compose_config(["model=hybrid_d20", "gpu=h100", "data=fineweb_edu",
                                             "gpu.micro_batch=4"]))
    T = config.model.sequence_len
    config.stage.total_batch_tokens = 8 * 4 * 2 * T  # 2 micro-batches of 4 per step on 8 GPUs
    p = planning.plan(config, [8], mfu=0.5, capacity=123 * GIB, ssm_kernels=True)
    assert p.capacity_bytes == 123 * GIB
    assert [r.grad_accum for r in p.rows] == [2, 2]
    flops = planning.flops_per_token(config.model, p.vocab_size)
    assert p.rows[0].tokens_per_s == pytest.approx(0.5 * 989 * 8 / flops * 10**12, rel=1e-14)
    config.gpu.peak_tflops_bf16 = 0.0  # unknown peak (the CPU preset): no rate
    assert planning.plan(config, [1], mfu=0.5, capacity=123 * GIB, ssm_kernels=True).rows[0].tokens_per_s is None


def test_setups_describe_themselves():
    assert planning.Setup(1, "ddp", 4, False).describe() == "1 GPU"
    assert planning.Setup(1, "fsdp", 4, True).describe() == "1 GPU, act. ckpt"
    assert planning.Setup(8, "fsdp", 4, False).describe() == "FSDP x8"
    assert planning.Setup(2, "ddp", 4, True).describe() == "DDP x2, act. ckpt"


def test_cpu_capacity_is_physical_memory_shared_by_the_local_ranks(monkeypatch):
    with open("/proc/meminfo") as f:  # MemTotal: the kernel's total RAM, as sysconf's pages count it
        physical = 1024 * int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    gpu = planning.GPUConfig(memory_gb=0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert planning.gpu_capacity(gpu) == physical
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert planning.gpu_capacity(gpu) == physical // 3
    # whole bytes, rounded down, also where the ranks do not divide the memory
    n = next(k for k in range(3, 100) if physical % k)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(n))
    share = planning.gpu_capacity(gpu)
    assert type(share) is int and share == physical // n
    assert planning.gpu_capacity(planning.GPUConfig(memory_gb=0.5)) == 2**29


def test_not_fit_reason_states_each_term_in_gib():
    """Against a stand-in planner whose memory is given: 1 + 2 + 3 + 4 GiB of tensors, overhead
    1 GiB + 10% of them = 2 GiB, 12 GiB in all, on a device of 11.5 GiB."""
    memory = planning.Memory(weights=GIB, grads=2 * GIB, optimizer=3 * GIB, activations=4 * GIB)
    stand_in = type("Planner", (), {"capacity": 23 * GIB // 2, "memory": lambda self, setup: memory})()
    assert planning.not_fit_reason(stand_in, planning.Setup(2, "fsdp", 3, True)) == (
        "micro_batch=3 with FSDP x2, act. ckpt needs 12.0 GiB per GPU (weights 1.0, gradients 2.0, optimizer 3.0, "
        "activations 4.0, overhead 2.0) but the device has 11.5 GiB")


class StandInPlanner:
    """What advice() asks of a planner, given by hand: the largest micro-batch per (GPUs, strategy,
    checkpointing), 0 where nothing fits, and one Memory for the micro-batch of 1 with checkpointing."""

    def __init__(self, best, memory=None, capacity=0, total=1):
        self.best, self.static, self.capacity = best, memory, capacity
        self.sizes = type("Sizes", (), {"total": total})()

    def max_micro_batch(self, setup):
        return self.best.get((setup.n_gpus, setup.strategy, setup.activation_checkpointing), 0)

    def memory(self, setup):
        assert setup.micro_batch == 1 and setup.activation_checkpointing
        return self.static


def test_advice_lists_what_fits_cheapest_first_and_else_how_small_a_model_would():
    fsdp = "fits: distributed.strategy=fsdp over"
    best = {(1, "ddp", False): 4, (1, "ddp", True): 16, (1, "fsdp", False): 1, (1, "fsdp", True): 1,
            (3, "fsdp", True): 1, (2, "fsdp", True): 2, (8, "fsdp", False): 8, (8, "fsdp", True): 32}
    assert planning.advice(StandInPlanner(best), planning.Setup(1, "ddp", 8, False)) == [
        "fits: gpu.micro_batch=4", "fits: gpu.activation_checkpointing=true (micro_batch 16)",
        f"{fsdp} 2 GPUs + gpu.activation_checkpointing=true (micro_batch 2)", f"{fsdp} 8 GPUs (micro_batch 8)",
        f"{fsdp} 8 GPUs + gpu.activation_checkpointing=true (micro_batch 32)"]
    # On 2 GPUs only 8 fit, and a micro-batch no smaller than the one asked (2) is no advice; the static
    # memory is asked at a micro-batch of 1 with checkpointing (the stand-in checks): 16 bytes per
    # parameter of 10^8 (4 + 8 + 4 per parameter), room (capacity - 1 GiB) / 1.1 - activations 10^8 = 8 * 10^8.
    static = planning.Memory(weights=4 * 10**8, grads=8 * 10**8, optimizer=4 * 10**8, activations=10**8)
    stand_in = StandInPlanner({(2, "ddp", False): 2, (8, "fsdp", True): 1}, static, GIB + 99 * 10**7, 10**8)
    assert planning.advice(stand_in, planning.Setup(2, "ddp", 2, False)) == [
        f"{fsdp} 8 GPUs + gpu.activation_checkpointing=true (micro_batch 1)",
        "nothing fits on 2 GPU(s): use a smaller model (weights, gradients and optimizer take 16 bytes per "
        "parameter here, so at most ~50M parameters) or a device with more memory"]
    stand_in.capacity = GIB  # no room at all: at most ~0M, not a negative size
    assert "at most ~0M parameters" in planning.advice(stand_in, planning.Setup(2, "ddp", 1, False))[-1]
    # room for 500,000.4 parameters of 1 byte: "~1M" (0.5000004 million, rounded), a hair above half a million
    one_byte = planning.Memory(weights=0, grads=0, optimizer=1, activations=499_999.6)
    stand_in = StandInPlanner({}, one_byte, GIB + 1_100_000, 1)
    assert planning.advice(stand_in, planning.Setup(1, "ddp", 1, False)) == [
        "nothing fits on 1 GPU(s): use a smaller model (weights, gradients and optimizer take 1 bytes per "
        "parameter here, so at most ~1M parameters) or a device with more memory"]


def test_plan_states_the_run_it_planned():
    """What plan() records: the model, the card, the dtype, the kernels (assumed for `auto` on CUDA,
    or as given), the activation parts with the configured checkpointing, one DDP row on 1 GPU and a
    DDP and an FSDP row beyond, each with the configured checkpointing."""
    config, _ = typed_config(compose_config(["model=hybrid_d20", "gpu=h100", "data=fineweb_edu",
                                             "gpu.ssm_backend=auto", "gpu.activation_checkpointing=true"]))
    p = planning.plan(config, [1, 2], mfu=0.4, capacity=80 * GIB)
    assert (p.model, p.gpu, p.dtype, p.ssm_kernels) == ("hybrid_d20", "h100", "bfloat16", True)
    assert p.activation_bytes_per_token == planning.activation_bytes_per_token(
        config.model, p.vocab_size, autocast=True, ssm_kernels=True, checkpointing=True)
    assert "recompute" in p.activation_bytes_per_token
    assert [(r.setup.n_gpus, r.setup.strategy, r.setup.activation_checkpointing) for r in p.rows] == [
        (1, "ddp", True), (2, "ddp", True), (2, "fsdp", True)]
    assert not planning.plan(config, [1], mfu=0.4, capacity=80 * GIB, ssm_kernels=False).ssm_kernels
    # `auto` is shown at the largest micro-batch that fits each way, at 1 where none does
    rows = planning.plan(config, [1], mfu=0.4, capacity=80 * GIB).rows
    assert rows[0].setup.micro_batch == rows[0].max_micro_batch > 1
    rows = planning.plan(config, [1], mfu=0.4, capacity=GIB).rows
    assert (rows[0].setup.micro_batch, rows[0].max_micro_batch, rows[0].fits) == (1, 0, False)


def test_auto_micro_batch_follows_the_strategy_checkpointing_and_importable_kernels(monkeypatch):
    overrides = ["model=hybrid_d20", "gpu=h100", "data=fineweb_edu", "gpu.ssm_backend=auto"]
    config, _ = typed_config(compose_config(overrides))
    ddp = planning.resolve_micro_batch(config, 2, 24 * GIB, ssm_kernels=True)
    fsdp, _ = typed_config(compose_config(overrides + ["distributed.strategy=fsdp"]))
    assert planning.resolve_micro_batch(fsdp, 2, 24 * GIB, ssm_kernels=True) > ddp  # the shards leave more room
    ckpt, _ = typed_config(compose_config(overrides + ["gpu.activation_checkpointing=true"]))
    assert planning.resolve_micro_batch(ckpt, 2, 24 * GIB, ssm_kernels=True) > ddp
    # training checks that the kernels import (here they may not): the answer of the kernels it finds
    from hybridchat.model import mamba
    with_kernels = planning.resolve_micro_batch(config, 1, 24 * GIB, ssm_kernels=True)
    without = planning.resolve_micro_batch(config, 1, 24 * GIB, ssm_kernels=False)
    assert with_kernels != without
    assert planning.resolve_micro_batch(config, 1, 24 * GIB) == planning.resolve_micro_batch(
        config, 1, 24 * GIB, ssm_kernels=mamba.cuda_kernels_available())
    for available, expected in ((True, with_kernels), (False, without)):  # h100: auto on cuda, so checked
        monkeypatch.setattr(mamba, "cuda_kernels_available", lambda: available)
        assert planning.resolve_micro_batch(config, 1, 24 * GIB) == expected
    # nothing fits the configured strategy (FSDP here): the advice starts from the first of its rows
    fsdp, _ = typed_config(compose_config(["model=hybrid_d20", "gpu=h100", "data=fineweb_edu",
                                           "gpu.activation_checkpointing=true", "distributed.strategy=fsdp"]))
    advice = planning.plan(fsdp, [1, 8], mfu=0.4, capacity=GIB, ssm_kernels=True).advice
    assert advice[0].startswith("micro_batch=1 with 1 GPU, act. ckpt needs")


def hand_plan(**changes) -> planning.Plan:
    """A Plan built by hand for render(): 1.5 GiB per device; a row that fits (5 GiB of tensors, so
    1.5 GiB of overhead) and one that does not (3 GiB of tensors: 1 GiB + 0.3 GiB of overhead)."""
    fits = planning.Row(setup=planning.Setup(1, "ddp", 4, False),
                        memory=planning.Memory(weights=GIB, grads=GIB, optimizer=2 * GIB, activations=GIB),
                        fits=True, max_micro_batch=8, grad_accum=2, tokens_per_s=12345.6)
    too_big = planning.Row(setup=planning.Setup(8, "fsdp", 1, True),
                           memory=planning.Memory(weights=GIB // 4, grads=GIB // 4, optimizer=GIB // 4,
                                                  activations=9 * GIB // 4),
                           fits=False, max_micro_batch=0, grad_accum=None, tokens_per_s=None)
    fields = dict(model="m20", gpu="card", vocab_size=100, sequence_len=1024, dtype="bfloat16", ssm_kernels=True,
                  capacity_bytes=3 * GIB // 2, mfu=0.4, params={"embedding": 1_350_001, "attention": 2_000_000},
                  activation_bytes_per_token={"attention blocks": 2048.0, "embedding + head": 1024.0},
                  rows=[fits, too_big], advice=["it needs more", "fits: this", "fits: that"])
    return planning.Plan(**{**fields, **changes})


ASSUMED = ("assumed: MFU 40% of the preset's peak bf16 TFLOP/s (x1.33 work with activation checkpointing); "
           "overhead 1 GiB + 10% of tensors; eager PyTorch (torch.compile usually saves less)")


def test_render_prints_the_plan_line_by_line():
    """render() of a hand-built Plan, every line as written out here: the first column left-aligned,
    the others right-aligned to their widest cell, two spaces apart; GiB with two decimals, parameters
    in millions with one (1,350,001 and 3,350,001: a hair above the halves, rounded up), activations per
    sequence in MiB."""
    assert plan.render(hand_plan()).split("\n") == [
        "model=m20 gpu=card: 1.5 GiB per device, bfloat16, sequence_len 1024, vocab 100, Mamba scan: mamba_ssm kernels",
        "parameters: embedding 1.4M, attention 2.0M; total 3.4M",
        "activations per sequence: attention blocks 2 MiB, embedding + head 1 MiB",
        "setup               micro  weights  grads  optim  activ  overhd  total GiB  fits  max micro  accum   tok/s",
        "1 GPU                   4     1.00   1.00   2.00   1.00    1.50       6.50   yes          8      2  12,346",
        "FSDP x8, act. ckpt      1     0.25   0.25   0.25   2.25    1.30       4.30    NO       none      -       -",
        "does not fit: it needs more",
        "  fits: this",
        "  fits: that",
        ASSUMED]
    # no advice: no "does not fit" lines; the PyTorch scan; another MFU; one row sets the widths
    p = hand_plan(advice=[], ssm_kernels=False, mfu=0.55, rows=hand_plan().rows[1:], dtype="float32")
    assert plan.render(p).split("\n") == [
        "model=m20 gpu=card: 1.5 GiB per device, float32, sequence_len 1024, vocab 100, Mamba scan: PyTorch chunked SSD",
        "parameters: embedding 1.4M, attention 2.0M; total 3.4M",
        "activations per sequence: attention blocks 2 MiB, embedding + head 1 MiB",
        "setup               micro  weights  grads  optim  activ  overhd  total GiB  fits  max micro  accum  tok/s",
        "FSDP x8, act. ckpt      1     0.25   0.25   0.25   2.25    1.30       4.30    NO       none      -      -",
        ASSUMED.replace("MFU 40%", "MFU 55%")]


@pytest.mark.parametrize("override, message", [
    ("n_gpus=[]", "n_gpus=[] must list GPU counts >= 1, e.g. [1, 8]"),
    ("n_gpus=[2,0]", "n_gpus=[2, 0] must list GPU counts >= 1, e.g. [1, 8]"),
    ("mfu=0", "mfu=0.0 must be in (0, 1], e.g. 0.4"),
    ("mfu=1.01", "mfu=1.01 must be in (0, 1], e.g. 0.4")])
def test_planner_app_refuses_no_gpu_counts_a_count_below_one_and_an_mfu_outside_0_1(override, message, tmp_path):
    with pytest.raises(UserError) as e:
        plan.run(plan_config([override], tmp_path))
    assert str(e.value) == message
    assert not (tmp_path / "plan.json").exists()


def test_planner_app_plans_each_gpu_count_once_in_order_at_the_given_mfu(tmp_path, capsys):
    """n_gpus=[8,1,8] at mfu=1 (the largest allowed): rows for 1 GPU, then DDP and FSDP over 8, each
    once; the tokens per second follow the MFU (the CPU preset states no peak: a made-up one here);
    stdout is the rendered plan and then where plan.json went; plan.json holds the same plan."""
    cfg = plan_config(["n_gpus=[8,1,8]", "mfu=1", "gpu.peak_tflops_bf16=10"], tmp_path)
    result = plan.run(cfg)
    assert [(r.setup.n_gpus, r.setup.strategy) for r in result.rows] == [(1, "ddp"), (8, "ddp"), (8, "fsdp")]
    assert result.mfu == 1.0
    config, _ = typed_config(compose_config([]))  # the same model and data (conf/plan.yaml's defaults)
    flops = planning.flops_per_token(config.model, result.vocab_size)
    assert result.rows[0].tokens_per_s == pytest.approx(10e12 / flops, rel=1e-12)
    assert capsys.readouterr().out == plan.render(result) + f"\nplan: {tmp_path / 'plan.json'}\n"
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["mfu"] == 1.0 and [r["setup"]["n_gpus"] for r in saved["rows"]] == [1, 8, 8]
    assert saved["rows"][2]["setup"]["strategy"] == "fsdp" and saved["model"] == result.model


def test_allowed_micro_batches_are_powers_of_two_or_the_divisors_of_the_rows_per_rank():
    """Without stage.total_batch_tokens: 1, 2, 4, ... 2^19 (the largest tried). With 12 sequences per
    step: the divisors of 12, 6 and 4 rows per rank over 1, 2 and 3 ranks; over 5 ranks (2.4 rows)
    the loop's own error, also when 12 sequences cannot be cut even into micro-batches of 1."""
    config, _ = typed_config(compose_config([]))
    T = config.model.sequence_len
    planner = planning.make_planner(config, GIB, ssm_kernels=False)
    powers = planner.allowed_micro_batches(1)
    assert len(powers) == 20 and powers[:5] == [1, 2, 4, 8, 16] and powers[-1] == 524288
    assert all(b == 2 * a for a, b in zip(powers, powers[1:]))
    config.stage.total_batch_tokens = 12 * T
    planner = planning.make_planner(config, GIB, ssm_kernels=False)
    assert planner.allowed_micro_batches(1) == [1, 2, 3, 4, 6, 12]
    assert planner.allowed_micro_batches(2) == [1, 2, 3, 6]
    assert planner.allowed_micro_batches(3) == [1, 2, 4]
    with pytest.raises(UserError) as e:
        planner.allowed_micro_batches(5)
    assert str(e.value) == (f"stage.total_batch_tokens={12 * T} must be a positive multiple of gpu.micro_batch x "
                            f"model.sequence_len x world_size = 1 x {T} x 5 = {5 * T}")


def test_model_sizes_by_hand():
    """Parameters counted by hand: d=64, 4 heads of 16 (2 KV heads: kv=32), Mamba d_inner 128 in 4 heads
    of 32, d_state 16, 1 group, conv width 4, relu^2 MLP of 256, vocabulary 100.
    Attention block's mixer: q and out 64*64 each, k and v 32*64 each = 12288. MLP: 2*256*64 = 32768.
    Mamba: in_proj (2*128 + 2*16 + 4)*64 = 18688, conv (128 + 2*16)*4 + bias 160 = 800, dt_bias, A_log
    and D 3*4, the gated norm's 128, out_proj 128*64 = 8192: 27820. Embedding and head 100*64 = 6400
    each."""
    from hybridchat.model.config import ModelConfig

    base = dict(n_embd=64, n_head=4, n_kv_head=2, expand=2, headdim=32, d_state=16, ngroups=1, chunk_size=8,
                sequence_len=16, mlp_ratio=4)
    # A A M M, MLPs only after attention, norm weights (64 per norm: 4 before the mixers, 2 before the
    # MLPs, the final one), the pointer (q and k 16*64 each, a gate of 64 + 1) and the request match (64).
    cfg = ModelConfig(**base, n_layer=4, block_pattern="AAMM", mamba_mlp=False, norm_weights=True, pointer=True,
                      request_match=True)
    sizes = planning.model_sizes(cfg, 100)
    assert sizes.params == {"embedding": 6400, "lm_head": 6400, "attention": 2 * 12288, "mamba": 2 * 27820,
                            "mlp": 2 * 32768, "pointer": 2113, "request match": 64, "norms": 7 * 64}
    assert sizes.total == 161177 and sizes.pattern == "AAMM"
    # Muon's matrices: attention's 2*12288, the MLPs' 2*32768, in_proj and out_proj 2*(18688 + 8192),
    # the pointer's q and k 2048; the autocast copies add the conv weights 2*640 and the head 6400.
    assert sizes.matrix == 24576 + 65536 + 2 * (18688 + 8192) + 2048 == 145920
    assert sizes.matmul == 145920 + 1280 + 6400
    # the largest block is an attention one: 12288 + 32768 + its 2 norms; the root is the rest:
    # embedding, head, final norm, pointer, request match
    assert sizes.largest_block == 12288 + 32768 + 128
    assert sizes.root == 6400 + 6400 + 64 + 2113 + 64
    # M A with an MLP after each, tied embeddings (no head of its own: the embedding is the head's
    # matmul), no norm weights: no entries of zero
    cfg = ModelConfig(**base, n_layer=2, block_pattern="MA", mamba_mlp=True, tie_embeddings=True)
    sizes = planning.model_sizes(cfg, 100)
    assert sizes.params == {"embedding": 6400, "mamba": 27820, "attention": 12288, "mlp": 2 * 32768}
    assert sizes.total == 6400 + 27820 + 12288 + 65536 and sizes.root == 6400
    assert sizes.matmul == 12288 + 65536 + 18688 + 8192 + 640 + 6400
    assert sizes.largest_block == 27820 + 32768


def test_training_memory_counts_muon_and_one_micro_batch_by_default():
    """Optimizer state by hand for 1000 parameters, 600 of them block matrices, on one GPU: Muon's one
    fp32 buffer per matrix parameter and AdamW's two per other parameter, 4 * (600 + 2 * 400) = 5600
    bytes, unless muon=False: AdamW's two on all, 8000; halved by FSDP over 2 GPUs."""
    from hybridchat.model.config import ModelConfig

    sizes = planning.Sizes(params={}, total=1000, matrix=600, matmul=0, largest_block=100, root=100, pattern="A")
    cfg = ModelConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=2, block_pattern="A", sequence_len=16)
    one = planning.Setup(1, "ddp", 1, False)
    assert planning.training_memory(sizes, cfg, 100, one, False, False).optimizer == 5600
    assert planning.training_memory(sizes, cfg, 100, one, False, False, muon=True).optimizer == 5600
    assert planning.training_memory(sizes, cfg, 100, one, False, False, muon=False).optimizer == 8000
    # FSDP on one GPU shards nothing and gathers nothing: weights and gradients 4 * 1000 as under DDP
    alone = planning.training_memory(sizes, cfg, 100, planning.Setup(1, "fsdp", 1, False), False, False)
    assert (alone.weights, alone.grads, alone.optimizer) == (4000, 4000, 5600)
    two = planning.Setup(2, "fsdp", 1, False)
    assert planning.training_memory(sizes, cfg, 100, two, False, False, muon=False).optimizer == 4000
    # DDP over 2 GPUs: whole weights, optimizer state, and gradients twice (its buckets)
    ddp = planning.training_memory(sizes, cfg, 100, planning.Setup(2, "ddp", 1, False), False, False)
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (4000, 8000, 5600)
    # activations under bf16 autocast: this attention block 2992 bytes per token and the embedding and
    # head 1856 (tests/test_activation_bytes_per_token_by_hand's sizes, vocabulary 100), for 3 rows of
    # 16 tokens, and the autocast copies of the 700 matmul weights, 2 bytes each
    copies = replace(sizes, matmul=700)
    three = planning.Setup(1, "ddp", 3, False)
    assert planning.training_memory(copies, cfg, 100, three, True, True).activations == (2992 + 1856) * 3 * 16 + 1400
    # in fp32 no weight copies: the bytes per token (activation_bytes_per_token, by hand above) for 48 tokens
    parts = planning.activation_bytes_per_token(cfg, 100, autocast=False, ssm_kernels=True)
    assert planning.training_memory(copies, cfg, 100, three, False, True).activations == sum(parts.values()) * 48
    # FSDP's weights: the shard (500) and, gathered at a block's copy-out, the root + max(root, block)
    # + 2 blocks = 400
    assert planning.training_memory(sizes, cfg, 100, two, False, False).weights == 4 * (500 + 400)
    # FSDP's gradients: by default one micro-batch per step, the shard (500) and what is gathered at
    # the peak, max(2 roots - a root's shard, a root + 2 blocks - a shard of each) = 200; accumulating,
    # whole gradients and a block, 1000 + 100
    assert planning.training_memory(sizes, cfg, 100, two, False, False).grads == 4 * (500 + 200)
    assert planning.training_memory(sizes, cfg, 100, two, False, False, accumulating=False).grads == 2800
    assert planning.training_memory(sizes, cfg, 100, two, False, False, accumulating=True).grads == 4 * 1100
