"""Test environment: offline, wandb disabled, each process's threads its share of the cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def _thread_share() -> int:
    """The cores this process may run on (taskset counts) divided among pytest-xdist's workers, at
    least 1: `make test` runs 2 workers on CI's 2 cores, and 2 threads each would oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


# Set before torch is imported, and in the environment, so that the processes tests start (training
# runs, torchrun's ranks, servers) inherit it. A worker always takes its share (the controller's value,
# inherited, counted no workers); a serial run keeps an OMP_NUM_THREADS given to it.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(_thread_share())
else:
    os.environ.setdefault("OMP_NUM_THREADS", str(_thread_share()))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which marks the groups
def pytest_collection_modifyitems(config, items):
    # --dist loadgroup tells the controller a test's xdist_group by a suffix on its node id; where that
    # mechanism fails (pytest 9.2 with pytest-xdist 3.8, its issue 1386) the groups are silently ignored,
    # and a file's costly module fixtures then run once per worker.
    if getattr(config.option, "loadgroup", False):  # set in an xdist worker of a --dist loadgroup run
        lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(f"--dist loadgroup lost the xdist_group of {len(lost)} tests (e.g. {lost[0]}): "
                                    f"pytest {pytest.__version__} with this pytest-xdist does not group")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.conf import RunMode  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from hybridchat.infra import config as config_schema  # noqa: E402
from hybridchat.model.config import ModelConfig  # noqa: E402
from hybridchat.training.stages import stage_schemas  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
config_schema.register(stage_schemas())


def free_port() -> int:
    """A TCP port nothing listens on now, the OS's pick, for a server or a rendezvous a test starts: a fixed
    port collides with another xdist worker, or another run of the suite on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_result(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command's main(argv), as `python -m hybridchat.X argv` ends."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def compose_config(overrides: list[str], output_dir: Path | None = None, config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose like `python -m hybridchat.train <overrides>` does, with HydraConfig set so that
    ${hydra:...} interpolations resolve; returns the job config (without the hydra node)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or Path.cwd())
        cfg.hydra.job.num = 0
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture
def smoke_overrides(tmp_path):
    """A seconds-long pretraining run writing everything under tmp_path."""
    return ["debug=smoke", f"paths.outputs={tmp_path}", "run_name=test"]


def train_steps(model, optimizers, tokens, steps: int, after_step=None) -> list[float]:
    """Plain full-batch next-token training on `tokens`; the losses, step by step."""
    losses = []
    for step in range(steps):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad()
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
    return losses


def random_model(pattern: str, n_layer: int, vocab: int, dtype=torch.float64, seed: int = 0, perturb: float = 0.3,
                 **options):
    """A small HybridLM (width 32) with every parameter perturbed by `perturb` x N(0, 1): zero-initialised
    output projections would make every block the identity. options: more ModelConfig keys, or other
    values for the ones set here."""
    from hybridchat.infra.build import build_model
    from hybridchat.model.config import ModelConfig

    sizes = dict(n_layer=n_layer, n_embd=32, n_head=4, n_kv_head=2, block_pattern=pattern, mlp_ratio=2, d_state=8,
                 headdim=16, chunk_size=8, sequence_len=128)
    cfg = ModelConfig(**{**sizes, **options})
    torch.manual_seed(seed)
    model = build_model(cfg, vocab)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * perturb)
    return model.to(dtype).eval()


def naive_greedy(model, prompt, n, inject=None, pair=None):
    """Greedy generation by a full forward over the whole sequence for every new token: the
    reference the engine's cached generation is compared with. inject(tokens so far) may return
    tokens to append (a query hook's retrieved text). pair=(opening, closing): the closing token is
    ruled out unless the output's last of the two is an opening one (engine's paired_tokens)."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1].clone()
            if pair is not None:
                last = {t: max((i for i, o in enumerate(out) if o == t), default=-1) for t in pair}
                if last[pair[0]] <= last[pair[1]]:
                    logits[pair[1]] = -float("inf")
            tok = logits.argmax().item()
            out.append(tok)
            seq.append(tok)
            extra = inject(out) if inject else None
            if extra:
                out.extend(extra)
                seq.extend(extra)
    return out


TINY_VOCAB = 37


def tiny_lm(pattern: str = "MA", seed: int = 0, **options):
    """The fast tests' float64 model: random_model with one layer per letter of `pattern`, scan chunks of 4
    and sequences of 64, over TINY_VOCAB tokens."""
    return random_model(pattern, len(pattern), TINY_VOCAB, seed=seed, chunk_size=4, sequence_len=64, **options)


# A tiny model saved as a step folder (tests/test_checkpoint.py); tests/test_loop.py builds its optimizers.
CKPT_MODEL = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8, headdim=16,
                         mlp_ratio=1, chunk_size=4, sequence_len=16)

# The toy stage's model (tests/test_loop.py), also behind small checkpoints and engine tests.
TOY_MODEL = ModelConfig(n_layer=2, n_embd=16, n_head=2, n_kv_head=1, block_pattern="AM", d_state=4, headdim=8,
                        mlp_ratio=1, chunk_size=4, sequence_len=8)
TOY_VOCAB = 40


class StubTokenizer:
    """What checkpoint.save asks of a tokenizer: a fingerprint for meta.json and a file beside the weights."""

    fingerprint = "stub"

    def save(self, path):
        path.write_text("{}")


def train_at_eval_cadence(train, overrides: list[str], out: Path, runs: Path, stage: str, every: int):
    """Train `overrides` (checkpoints and caches under `out`, run folder under `runs`) evaluating every
    `every` steps; (final weights, the global generators' states after it, evaluations run). Python's
    and NumPy's global generators are put in one state before (the run seeds PyTorch's itself), so
    runs that leave them alike drew alike from them."""
    from safetensors.torch import load_file

    from hybridchat.infra import checkpoint

    random.seed(0)
    np.random.seed(0)
    name = f"every{every}"
    train(overrides + [f"paths.outputs={out}", f"run_name={name}", f"stage.eval_every={every}"], runs / name)
    weights = load_file(checkpoint.latest(out / "checkpoints" / name / stage) / "model.safetensors")
    kind, keys, *position = np.random.get_state()
    states = (random.getstate(), (kind, keys.tolist(), *position), torch.get_rng_state().tolist())
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return weights, states, sum("val/bpb" in r for r in records)


def assert_evaluation_changed_no_training(often, seldom) -> None:
    """Two train_at_eval_cadence results: more evaluations, yet bit-identical weights and global
    generators left alike."""
    assert often[2] > seldom[2]
    assert often[0].keys() == seldom[0].keys()
    assert all(torch.equal(often[0][k], seldom[0][k]) for k in often[0]), \
        [k for k in often[0] if not torch.equal(often[0][k], seldom[0][k])]
    assert often[1] == seldom[1], "evaluation drew from a global random generator"


def _in_group(rank: int, world_size: int, init_file: str, target, args):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        return target(rank, *args)
    finally:
        dist.destroy_process_group()


def _forked_rank(rank: int, world_size: int, init_file: str, target, args, results) -> None:
    # The parent's OpenMP pool does not survive the fork: a parallel region would wait for it forever.
    torch.set_num_threads(1)
    results.put((rank, _in_group(rank, world_size, init_file, target, args)))


def in_ranks(target, world_size: int, init_file, *args) -> dict:
    """target(rank, *args) on world_size ranks joined in one gloo group (init_file: a path that does not
    exist yet); what each returned, by rank. Rank 0 is this process (so mutmut's coverage of the test
    sees the calls), the others are forked from it: its imports (and, under mutmut, its mutant) carry
    over, so a rank starts in milliseconds."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    others = [context.Process(target=_forked_rank, args=(r, world_size, str(init_file), target, args, results))
              for r in range(1, world_size)]
    for p in others:
        p.start()
    try:
        got = {0: _in_group(0, world_size, str(init_file), target, args)}
        got.update(results.get(timeout=120) for _ in others)
    finally:
        for p in others:
            p.join(30)
            if p.exitcode is None:  # rank 0 failed and left it waiting in a collective
                p.kill()
    assert [p.exitcode for p in others] == [0] * len(others)
    return got
