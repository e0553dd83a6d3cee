"""training/muon.py: torch's Muon with the Newton-Schulz iterations in a chosen dtype, against
torch.optim.Muon itself (bfloat16 iterations, bit for bit) and a float64 plain loop."""

import pytest
import torch

from hybridchat.training.muon import Muon, iteration_dtype, newton_schulz

SHAPES = [(24, 24), (40, 16), (16, 40)]  # square, tall, wide
COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _pairs(seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def _step_both(ours, theirs, a, b, steps=3):
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            grad = torch.randn_like(p)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()


@pytest.mark.parametrize("options", [
    dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="original"),
    dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.01, ns_steps=3),
])
def test_bfloat16_iterations_equal_torch_muon_bit_for_bit(options):
    ours, theirs = _pairs()
    _step_both(ours, theirs, Muon(ours, ns_dtype=torch.bfloat16, **options), torch.optim.Muon(theirs, **options))
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def _plain_newton_schulz(matrix, steps):
    """float64, the quintic written out per iteration on the wide orientation."""
    a, b, c = COEFFICIENTS
    x = matrix.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / torch.linalg.matrix_norm(x)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * (gram @ x) + c * (gram @ gram @ x)
    return x.T if tall else x


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_iterations_follow_a_float64_plain_loop_and_bfloat16_ones_do_not(shape):
    torch.manual_seed(1)
    matrix = torch.randn(*shape)
    reference = _plain_newton_schulz(matrix, 5)
    fp32 = newton_schulz(matrix, COEFFICIENTS, 5, 1e-7, torch.float32)
    bf16 = newton_schulz(matrix, COEFFICIENTS, 5, 1e-7, torch.bfloat16)
    assert fp32.dtype == torch.float32 and fp32.shape == matrix.shape
    assert (fp32.double() - reference).abs().max() < 1e-5
    assert (bf16.double() - reference).abs().max() > 1e-3
    # near-orthogonal: the singular values land in about [0.5, 1.5] (not 1: the coefficients trade that for speed)
    singular = torch.linalg.svdvals(reference)
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_the_iterations_never_write_into_their_input():
    matrix = torch.randn(16, 40)
    before = matrix.clone()
    newton_schulz(matrix, COEFFICIENTS, 5, 1e-7, torch.float32)
    assert torch.equal(matrix, before)


def test_a_step_on_cpu_runs_float32_iterations_and_keeps_plain_momentum():
    """Without Nesterov the update is the momentum buffer itself; the iterations must leave it be.
    Against a plain loop: buffer = m buffer + (1 - m) grad; p = p (1 - lr wd) - lr sqrt(max(1, r/c)) NS(buffer)."""
    assert iteration_dtype(torch.device("cpu")) == torch.float32
    assert iteration_dtype(torch.device("cuda")) == torch.bfloat16
    torch.manual_seed(2)
    param = torch.nn.Parameter(torch.randn(40, 16))
    expected, buffer = param.detach().double().clone(), torch.zeros(40, 16, dtype=torch.float64)
    muon = Muon([param], lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=False)
    for _ in range(3):
        grad = torch.randn(40, 16)
        param.grad = grad
        muon.step()
        buffer = 0.9 * buffer + 0.1 * grad.double()
        expected = expected * (1 - 0.03 * 0.1) - 0.03 * (40 / 16) ** 0.5 * _plain_newton_schulz(buffer, 5)
        assert torch.allclose(muon.state[param]["momentum_buffer"].double(), buffer, atol=1e-6)
    assert (param.detach().double() - expected).abs().max() < 1e-5


def test_state_moves_between_torch_muon_and_ours_unchanged():
    """Checkpoints hold the same state under the same class name, so either loads the other's."""
    ours, theirs = _pairs()
    a, b = Muon(ours, lr=0.02, ns_dtype=torch.bfloat16), torch.optim.Muon(theirs, lr=0.02)
    _step_both(ours, theirs, a, b, steps=1)
    assert type(a).__name__ == type(b).__name__ == "Muon"
    fresh_ours, fresh_theirs = _pairs()
    c, d = Muon(fresh_ours, lr=0.02, ns_dtype=torch.bfloat16), torch.optim.Muon(fresh_theirs, lr=0.02)
    c.load_state_dict(b.state_dict())
    d.load_state_dict(a.state_dict())
    for p, q in zip(fresh_ours, fresh_theirs):
        assert torch.equal(c.state[p]["momentum_buffer"], d.state[q]["momentum_buffer"])
