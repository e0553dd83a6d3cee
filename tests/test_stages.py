"""training/stages/__init__.py: the base Stage's defaults, the LR schedule past the stage's own length,
bits per byte against a plain loop (special tokens, masked targets, ranks), and the registry's
answer to "which stage answers these questions" when it is not exactly one. (Hand values of the
schedule are in tests/test_train.py; registering a stage in tests/test_stage_registry.py.)"""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import CKPT_MODEL, TINY_VOCAB, StubTokenizer, in_ranks, tiny_lm

import hybridchat.training.stages as stages
from hybridchat.core.errors import UserError
from hybridchat.infra import checkpoint
from hybridchat.infra.config import StageConfig
from hybridchat.infra.runtime import Runtime
from hybridchat.model.lm import HybridLM
from hybridchat.training.stages import Stage, bits_per_byte, lr_multiplier

CPU = Runtime(torch.device("cpu"), None)
# Bytes per token: ids 0-2 are special (no bytes), the rest 1 to 4 bytes.
TOKEN_BYTES = torch.tensor([0, 0, 0] + [1 + i % 4 for i in range(TINY_VOCAB - 3)], dtype=torch.int32)


def _batches() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows, width in ((2, 7), (1, 5), (3, 4)):
        inputs = torch.randint(0, TINY_VOCAB, (rows, width), generator=gen)
        targets = torch.randint(0, TINY_VOCAB, (rows, width), generator=gen)
        targets[0, :2] = -1        # masked: no loss, no bytes
        targets[-1, -1] = 1        # a special token: no bytes, its loss left out
        out.append({"inputs": inputs, "targets": targets})
    return out


def plain_bits_per_byte(model, batches) -> float:
    """Position by position: nats of every target with bytes, over ln 2 x those bytes."""
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            log_p = model(batch["inputs"]).double().log_softmax(-1)
            for b, row in enumerate(batch["targets"].tolist()):
                for t, target in enumerate(row):
                    if target >= 0 and TOKEN_BYTES[target] > 0:
                        nats -= log_p[b, t, target].item()
                        nbytes += int(TOKEN_BYTES[target])
    return nats / (math.log(2) * nbytes)


def test_bits_per_byte_equals_a_plain_loop_leaving_out_masked_and_special_targets():
    model = tiny_lm().train()
    batches = _batches()
    got = bits_per_byte(model, batches, TOKEN_BYTES, CPU)
    assert model.training  # restored
    # The model's loss is a float32 cross-entropy (a float64 model too).
    assert got == pytest.approx(plain_bits_per_byte(model.eval(), batches), rel=1e-6)
    assert bits_per_byte(model, batches, TOKEN_BYTES, CPU) == got and not model.training
    assert bits_per_byte(model, [], TOKEN_BYTES, CPU) == 0.0  # nothing scored: 0, not a division by zero


def test_bits_per_byte_runs_under_the_runtimes_autocast():
    model = tiny_lm().float()
    batches = _batches()
    full = bits_per_byte(model, batches, TOKEN_BYTES, CPU)
    bf16 = bits_per_byte(model, batches, TOKEN_BYTES, Runtime(torch.device("cpu"), torch.bfloat16))
    assert bf16 != full and bf16 == pytest.approx(full, rel=0.02)


def _bpb_on_rank(rank: int, model, batches) -> float:
    return bits_per_byte(model, batches, TOKEN_BYTES, Runtime(torch.device("cpu"), None, rank=rank, world_size=2))


def test_two_ranks_each_score_every_other_batch_and_agree_with_one_process(tmp_path):
    model, batches = tiny_lm(), _batches()
    one = bits_per_byte(model, batches, TOKEN_BYTES, CPU)
    got = in_ranks(_bpb_on_rank, 2, tmp_path / "init", model, batches)
    assert got[0] == got[1] == pytest.approx(one, rel=1e-12)  # the same float32 losses, summed in float64


def _context(compile: bool = False, source: str | None = "mid", fingerprint: str = "stub"):
    config = SimpleNamespace(stage=StageConfig(num_steps=10, warmup_steps=2, source=source),
                             model=SimpleNamespace(sequence_len=96), gpu=SimpleNamespace(compile=compile))
    return SimpleNamespace(config=config, runtime=CPU, tokenizer=SimpleNamespace(
        fingerprint=fingerprint, token_bytes=lambda: TOKEN_BYTES))


def test_the_base_stage_defaults():
    ctx = _context()
    stage = Stage(ctx)
    assert (Stage.name, Stage.monitor, Stage.reads_documents, Stage.answers_hops) == ("stage", "val/bpb", False, 0)
    assert stage.config is ctx.config.stage and stage.source == "mid" and stage.milestones == frozenset()
    assert stage.width_limit is None and Stage(_context(compile=True)).width_limit == 96
    with pytest.raises(NotImplementedError):
        stage.train_batches(0, 0, 1)
    with pytest.raises(NotImplementedError):
        stage.val_batches()
    assert stage.samples(None) == [] and stage.checkpoint_meta() == {} and stage.step_metrics() == {}
    assert [stage.lr_multiplier(s) for s in range(10)] == [lr_multiplier(s, ctx.config.stage) for s in range(10)]
    assert stage.lr_multiplier(0) == 0.5  # warmup: step 1 of 2
    batch = _batches()[0]
    model = tiny_lm()
    torch.testing.assert_close(stage.training_step(model, batch), model(batch["inputs"], batch["targets"]))
    assert stage.batch_tokens(batch) == 2 * 7


def test_the_base_evaluation_is_bits_per_byte_on_the_validation_batches():
    class Validated(Stage):
        def val_batches(self):
            return _batches()

    model = tiny_lm()
    assert Validated(_context()).evaluate(model) == {"val/bpb": pytest.approx(plain_bits_per_byte(model, _batches()),
                                                                             rel=1e-6)}


def test_initialise_loads_the_source_checkpoint_of_the_same_tokenizer_only(tmp_path):
    torch.manual_seed(0)
    saved = HybridLM(CKPT_MODEL, vocab_size=TINY_VOCAB)
    saved.init_weights()
    path = checkpoint.save(tmp_path, 3, saved, [], {"config": {}, "tokenizer": "stub"}, keep=1,
                           tokenizer=StubTokenizer())
    fresh = HybridLM(CKPT_MODEL, vocab_size=TINY_VOCAB)
    Stage(_context()).initialise(fresh, path)
    for (name, a), b in zip(saved.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="tokenizer"):
        Stage(_context(fingerprint="another")).initialise(fresh, path)


def test_the_schedule_can_be_asked_for_another_length():
    s = StageConfig(num_steps=100, warmup_steps=0, warmdown_ratio=0.5, final_lr_frac=0.1)
    # 10 steps with half of them warmdown, whatever the stage's own 100 say: progress p = (10 - step) / 5
    # of the way from final_lr_frac to 1, i.e. p + (1 - p) 0.1.
    assert [lr_multiplier(i, s, num_steps=10) for i in range(10)] == pytest.approx(
        [1.0] * 6 + [0.82, 0.64, 0.46, 0.28])
    assert lr_multiplier(6, s) == 1.0


def test_exactly_one_stage_must_answer_each_kind_of_question(monkeypatch):
    assert stages.answering_stage(2).name == "refrag"
    with pytest.raises(RuntimeError, match=r"^0 stages answer 3-hop questions \(\[\]\); answers_hops must pick one$"):
        stages.answering_stage(3)
    stages.stage_classes()  # every module imported: the registry is complete
    monkeypatch.setattr(stages, "_REGISTERED", dict(stages._REGISTERED))

    @stages.registered
    class Another(Stage):
        name = "another"
        answers_hops = 1

    assert stages.stage_classes()["another"] is Another
    assert stages.stage_schemas()["another"] is StageConfig and stages.stage_schemas()["rag"].__name__ == "RagConfig"
    with pytest.raises(RuntimeError, match=r"^2 stages answer 1-hop questions \(\['rag', 'another'\]\)"):
        stages.answering_stage(1)


def test_a_stage_is_built_by_its_name_from_the_run_context(monkeypatch):
    stages.stage_classes()
    monkeypatch.setattr(stages, "_REGISTERED", dict(stages._REGISTERED))

    @stages.registered
    class Light(Stage):
        name = "light"

    ctx = _context()
    ctx.config.stage = StageConfig(name="light")
    built = stages.build_stage(ctx)
    assert type(built) is Light and built.ctx is ctx and built.config is ctx.config.stage
    ctx.config.stage = StageConfig(name="nope")
    with pytest.raises(UserError, match=r"^stage.name='nope' is unknown; allowed: \['distill', 'light', 'mid', "
                                        r"'pretrain', 'rag', 'refrag'\]$"):
        stages.build_stage(ctx)
