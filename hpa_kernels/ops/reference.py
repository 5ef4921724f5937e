"""Plain PyTorch backend (``"torch"``): the ground truth every other backend is tested against.

Written as the simple loop of DESIGN.md § Kernels: clear, not fast. Math is fp32 whatever the
storage dtype (AdamW) and fp64 for the HPA reductions, rounded once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """AdamW (Loshchilov & Hutter), the update of ``torch.optim.AdamW``, one tensor at a time.

    See ``hpa_kernels.ops.adamw_step`` for the contract.
    """
    if found_inf is not None and bool(found_inf.item()):
        return
    lr_value = float(lr)
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        if param.numel() == 0:
            step_t += 1
            continue
        g = grad.float()
        if grad_scale is not None:
            g = g / grad_scale.float()
        if maximize:
            g = -g
        p = param.float()
        step_t += 1
        step = float(step_t.item())
        p.mul_(1.0 - lr_value * weight_decay)
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        step_size = lr_value / bias_correction1
        denom = (exp_avg_sq.sqrt() / (bias_correction2**0.5)).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        param.copy_(p)


def hpa_reduce(
    w_prev: Tensor, w_new: Tensor, hinv_safety: Tensor, hinv_task: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HPA_SPEC.md Step 1's column scores and Step 3's Frobenius sums, in float64.

    See ``hpa_kernels.ops.hpa_reduce`` for the contract.
    """
    prev = w_prev.double()
    delta = w_new.double() - prev
    rows = prev.shape[0]
    energy = delta.square().sum(dim=0) / rows if rows > 0 else delta.new_zeros(prev.shape[1])
    eps_bar = energy / hinv_safety.double()
    zeta_bar = energy / hinv_task.double()
    dot = (delta * prev).sum()
    norm_sq = prev.square().sum()
    return eps_bar.float(), zeta_bar.float(), dot.float(), norm_sq.float()


def hpa_apply(w_prev: Tensor, w_new: Tensor, mask: Tensor, coef: float | Tensor, out: Tensor | None = None) -> Tensor:
    """HPA_SPEC.md Step 3's write, Ŵ = M ⊙ W_prev + (1 − M) ⊙ (W_new − coef·W_prev).

    See ``hpa_kernels.ops.hpa_apply`` for the contract.
    """
    coef_value = float(coef)
    adjusted = (w_new.float() - coef_value * w_prev.float()).to(w_new.dtype)
    result = torch.where(mask.view(1, -1), w_prev.to(w_new.dtype), adjusted)
    if out is None:
        return result
    out.copy_(result)
    return out
