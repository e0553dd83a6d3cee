"""Muon whose Newton-Schulz iterations run in the dtype the device multiplies fastest.

torch.optim.Muon always orthogonalises in bfloat16: right on a GPU (tensor cores), slow on a CPU
without bfloat16 matrix units, which multiplies bfloat16 several times slower than float32 (8x for
one 576x1536 Gram on the 2-core development machine, where the iterations took 73% of `make run`'s
pretraining step). This subclass keeps torch's algorithm, defaults, state and checkpoint format (the
class is still called Muon) and chooses only the dtype of the iterations: bfloat16 on CUDA, as torch
does, float32 elsewhere. With `ns_dtype=torch.bfloat16` its steps equal torch's bit for bit."""

import math

import torch


def iteration_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic iteration towards U V^T of matrix = U S V^T (Keller Jordan's coefficients drive the
    singular values into about [0.5, 1.5], not to 1, which trains as well). Works on the wide
    orientation, so the Gram matrix is the smaller one. Never writes into `matrix`."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(dtype)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # out of place: .to() returns the momentum buffer itself when dtypes agree
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, polynomial, x, beta=a)                     # a X + (b G + c G^2) X
    return x.T if tall else x


def adjusted_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    """torch's two rules for a rectangular update's size: "original" (Keller Jordan's, the default)
    or "match_rms_adamw" (Moonshot's, AdamW's learning rates carry over)."""
    rows, cols = shape[:2]
    if rule == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr * math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    def __init__(self, params, *, ns_dtype: torch.dtype | None = None, **kwargs):
        """ns_dtype: the dtype of the Newton-Schulz iterations; None chooses per device
        (iteration_dtype). Every other argument is torch.optim.Muon's."""
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, momenta = [], [], []
            self._init_group(group, params, grads, momenta)  # torch's: creates and lists the momentum buffers
            momentum, lr = group["momentum"], float(group["lr"])
            for param, grad, buffer in zip(params, grads, momenta):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype or iteration_dtype(update.device))
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
