"""The planner's FSDP terms against FSDP2 itself: one real training step of the tiny models on 2 gloo
ranks (laid out by parallel.prepare, as training does), measured on each rank by torch's
FSDPMemTracker, term by term: the gathered and prefetched blocks and the root, the gradients waiting
for their reduce-scatter, the optimizer's shards, the activations (with bf16 autocast's weight copies)."""

import pytest
import torch
from test_plan import training_step
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _FSDPState
from torch.distributed.fsdp import FSDPModule

from hybridchat.infra import parallel
from hybridchat.infra import planner as planning
from hybridchat.infra.build import build_model
from hybridchat.infra.runtime import Runtime
from hybridchat.train import typed_config
from hybridchat.training.loop import build_optimizers
from tests.conftest import compose_config, in_ranks

# One xdist worker for the file: its module fixture forks a second rank for all the cases at once.
pytestmark = pytest.mark.xdist_group("plan_fsdp")

RANKS = 2
# The tracker's kinds that make each of the planner's terms.
TERMS = {"weights": (_FSDPRefType.SHARDED_PARAM, _FSDPRefType.UNSHARDED_PARAM, _FSDPRefType.ALL_GATHER),
         "grads": (_FSDPRefType.SHARDED_GRAD, _FSDPRefType.UNSHARDED_GRAD, _FSDPRefType.REDUCE_SCATTER),
         "optimizer": (_FSDPRefType.OPT,),
         "activations": (_FSDPRefType.ACT, _FSDPRefType.TEMP)}
# Model, vocabulary, dtype, sequence length. A 512-token vocabulary makes the root (embedding, head,
# pointer: 0.3M parameters) smaller than a block (0.7-1.0M), so the blocks set the gathered peaks; at
# 4096 the root (2.1M) does. AdamW on the matrices: Muon's Newton-Schulz on DTensors (in bf16) took 40 s
# a step here. bf16 at 8 layers and 64 tokens: autocast's weight copies are a third of the activations.
# The last number: micro-batches per step (gradient accumulation: FSDP2 keeps whole gradients between them).
CASES = {"hybrid-512": ("hybrid_tiny", 512, "float32", 256, 4, 1),
         "hybrid-4096": ("hybrid_tiny", 4096, "float32", 256, 4, 1),
         "transformer-512": ("transformer_tiny", 512, "float32", 256, 4, 1),
         "mamba-4096": ("mamba_tiny", 4096, "float32", 256, 4, 1),
         "transformer-512-bf16": ("transformer_tiny", 512, "bfloat16", 64, 8, 1),
         "hybrid-512-accumulating": ("hybrid_tiny", 512, "float32", 256, 4, 2),
         "hybrid-4096-accumulating": ("hybrid_tiny", 4096, "float32", 256, 4, 3)}


def case_config(case: str):
    model, vocab, dtype, seq, layers, micro_batches = CASES[case]
    config, _ = typed_config(compose_config([f"model={model}", f"data.tokenizer_vocab_size={vocab}",
                                             f"gpu.dtype={dtype}", f"model.sequence_len={seq}",
                                             f"model.n_layer={layers}", "stage.matrix_optimizer=adamw",
                                             "distributed.strategy=fsdp", "gpu.micro_batch=1",
                                             f"stage.total_batch_tokens={seq * RANKS * micro_batches}"]))
    return config


class TermPeaks(FSDPMemTracker):
    """FSDPMemTracker (torch 2.13) keeping each term's own peak over the step (the planner adds the
    terms' peaks; the tracker's snapshot is of the total's peak), with FSDP's buffers counted as
    FSDP's from the moment they exist. Without that, the tracker counts as activations: the copy-out
    into a block's parameters until its pre-forward ends (labelled only then), a reduce-scatter's
    input until the collective runs, and a block's gradients until its post-backward."""

    def __init__(self, model, optimizers):
        super().__init__(model)
        self._root = model
        self.peaks = dict.fromkeys(TERMS, 0)
        self._reducing = False
        self._func = None
        for opt in optimizers:  # the optimizer's state exists (a step ran before): the tracker must know it
            self._track_optimizer_states(_FSDPRefType.OPT, opt)
        self._grad_hooks = [p.register_post_accumulate_grad_hook(self._gradient) for p in unsharded_params(model)]

    def _gradient(self, param):
        self._update_and_maybe_create_winfos(param.grad, _FSDPRefType.UNSHARDED_GRAD)

    def _fsdp_state_pre_forward(self, fsdp_mod, orig):
        wrapped = super()._fsdp_state_pre_forward(fsdp_mod, orig)

        def next_micro_batch(*args, **kwargs):
            # The tracker refuses a root's second forward (it keeps per-module stats for one
            # iteration, which the terms do not use): a micro-batch's starts them afresh.
            if fsdp_mod is self._root:
                self.reset_mod_stats()
            return wrapped(*args, **kwargs)
        return next_micro_batch

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig):
        wrapped = super()._fsdp_param_group_post_backward(fsdp_mod, orig)

        def reducing(*args, **kwargs):
            self._reducing = True
            try:
                return wrapped(*args, **kwargs)
            finally:
                self._reducing = False
        return reducing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._func = func
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _track(self, reftype, t):
        if self._reducing and reftype == _FSDPRefType.TEMP:
            # FSDP allocates the reduce-scatter's input and output (aten.empty); anything else here is
            # gloo's copy of the input (NCCL reduces in place): Inputs, which no term counts.
            fsdp_buffer = self._func is torch.ops.aten.empty.memory_format
            reftype = _FSDPRefType.REDUCE_SCATTER if fsdp_buffer else _FSDPRefType.INP
        elif self._fsdp_state in (_FSDPState.PRE_FW, _FSDPState.PRE_BW) and reftype in (_FSDPRefType.ACT,
                                                                                         _FSDPRefType.TEMP):
            reftype = _FSDPRefType.ALL_GATHER
        super()._track(reftype, t)

    def _update_peak_stats(self, peak_state):
        super()._update_peak_stats(peak_state)
        now = self._curr_mem_snap.get(torch.device("cpu"), {})
        for term, kinds in TERMS.items():
            self.peaks[term] = max(self.peaks[term], sum(now.get(kind, 0) for kind in kinds))

    def __exit__(self, *args):
        super().__exit__(*args)
        for hook in self._grad_hooks:
            hook.remove()


def unsharded_params(model) -> list[torch.nn.Parameter]:
    """The whole parameters FSDP2 gathers into (kept between steps, their storage freed when resharded)."""
    return [p._unsharded_param for m in model.modules() if isinstance(m, FSDPModule)
            for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params]


def measure_case(rank: int, case: str) -> dict[str, int]:
    """Each term's peak bytes and the total's over the second training step on this rank."""
    config = case_config(case)
    torch.manual_seed(0)
    vocab = planning.vocab_size_of(config.model, config.data)
    model = build_model(config.model, vocab)
    model.init_weights()
    model.train()
    train_model = parallel.prepare(model, config, Runtime(torch.device("cpu"), None, rank, rank, RANKS))
    optimizers = build_optimizers(model, config.stage)
    tokens = torch.randint(0, vocab, (1, config.model.sequence_len + 1), generator=torch.Generator().manual_seed(rank))
    dtype = getattr(torch, config.gpu.dtype.value)
    micro_batches = CASES[case][-1]
    # the first step: the optimizer's state and FSDP's lazy initialisation, as from the second step on
    training_step(train_model, model, optimizers, tokens, dtype, micro_batches)
    tracker = TermPeaks(train_model, optimizers)
    with tracker:
        training_step(train_model, model, optimizers, tokens, dtype, micro_batches)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {**tracker.peaks, "total": peak["Total"]}


def measure_all(rank: int) -> dict[str, dict[str, int]]:
    torch.set_num_threads(1)
    return {case: measure_case(rank, case) for case in CASES}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{rank: {case: {term: bytes}}}: both ranks hold the same shards' sizes and run the same ops."""
    return in_ranks(measure_all, RANKS, tmp_path_factory.mktemp("plan_fsdp") / "init")


# (term, how far above the measured peak the estimate may be, how far below): weights, optimizer and
# activations are the measured bytes; weights and gradients use the largest block where the peak may
# be at a smaller one, the root where only the head's gradient is live; the total adds the terms'
# peaks, which do not coincide in time, so it may only be over.
TOLERANCES = [("weights", 0.06, 0.01), ("grads", 0.06, 0.01), ("optimizer", 0.01, 0.01),
              ("activations", 0.05, 0.05), ("total", 0.45, 0.0)]


@pytest.mark.parametrize("case", CASES)
def test_fsdp_terms_against_fsdp2_measured_on_two_ranks(case, measured):
    config = case_config(case)
    planner = planning.make_planner(config, 64 * 2**30, ssm_kernels=False)
    estimate = planner.memory(planning.Setup(RANKS, "fsdp", 1, False))
    planned = {"weights": estimate.weights, "grads": estimate.grads, "optimizer": estimate.optimizer,
               "activations": estimate.activations, "total": estimate.tensors}
    for rank, cases in measured.items():
        for term, over, under in TOLERANCES:
            ours, theirs = planned[term], cases[case][term]
            error = (ours - theirs) / theirs
            assert -under <= error <= over, f"{case} rank {rank} {term}: estimate {ours / 2**20:.2f} MiB, " \
                                            f"measured {theirs / 2**20:.2f} MiB ({error:+.1%})"
