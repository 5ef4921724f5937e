"""Layouts the kernels of the ``"cpu"``, ``"cuda"`` and ``"triton"`` backends take, and the
temporaries standing in for the caller's tensors when theirs do not fit (written back, so the
caller's tensors are updated in place and results equal those on contiguous copies)."""

from __future__ import annotations

import torch
from torch import Tensor

from .schema import OnlineTensors


def layout(t: Tensor) -> str | None:
    """The dense memory format of ``t`` (``None`` when it is not dense in a standard format)."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


class Staging:
    """Temporaries standing in for the caller's tensors, written back by :meth:`finish`."""

    def __init__(self) -> None:
        self._writebacks: list[tuple[Tensor, Tensor]] = []
        self.keep: list[Tensor] = []  # temporaries whose addresses a kernel reads

    def scalar_tensor(self, t: Tensor | None, device: torch.device) -> Tensor:
        """``t`` (one element) as an fp32 0-d tensor on ``device`` (a zero placeholder for ``None``); read-only."""
        if t is None:
            return torch.zeros(1, dtype=torch.float32, device=device)
        tmp = t.detach().reshape(()).to(device=device, dtype=torch.float32).contiguous()
        self.keep.append(tmp)
        return tmp

    def scalar_ptr(self, t: Tensor | None, device: torch.device) -> int:
        """Address of ``t`` as an fp32 scalar on ``device`` (0 for ``None``); read-only."""
        return 0 if t is None else self.scalar_tensor(t, device).data_ptr()

    def like(self, t: Tensor, ref: Tensor, *, dtype: torch.dtype | None = None, write_back: bool = False) -> Tensor:
        """``t`` itself when it has ``ref``'s dense layout, dtype and device, else a copy in that layout."""
        dtype = dtype or t.dtype
        if t.dtype == dtype and t.device == ref.device and layout(t) is not None and layout(t) == layout(ref):
            if t.stride() == ref.stride() or t.numel() == 0:
                return t
        tmp = torch.empty_like(ref, dtype=dtype).copy_(t)  # empty_like keeps ref's dense strides
        if write_back:
            self._writebacks.append((t, tmp))
        return tmp

    def dense(self, t: Tensor, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
        """``t`` when dense (and of ``dtype`` / on ``device``), else a contiguous copy written back later."""
        dtype, device = dtype or t.dtype, device or t.device
        if layout(t) is not None and t.dtype == dtype and t.device == device:
            return t
        tmp = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        self._writebacks.append((t, tmp))
        return tmp

    def contiguous(self, t: Tensor, *, write_back: bool = False) -> Tensor:
        """``t`` when contiguous, else a contiguous copy kept alive until :meth:`finish` (and
        written back then with ``write_back``)."""
        if t.is_contiguous():
            return t
        tmp = t.contiguous()
        self.keep.append(tmp)
        if write_back:
            self._writebacks.append((t, tmp))
        return tmp

    def adamw(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor) -> tuple[Tensor, ...]:
        """One parameter's ``(p, g, m, v, step)`` in the layout of the AdamW kernels: p dense, g
        (in p's dtype), m and v in p's dense strides, step a dense fp32 0-d tensor on p's device.
        Tensors already so are returned as they are (no copy); copies of those the step updates
        are written back by :meth:`finish`, and every copy is kept alive until then (the kernels
        take addresses)."""
        device = p.device
        if (
            p.is_contiguous()
            and g.is_contiguous()
            and m.is_contiguous()
            and v.is_contiguous()
            and g.dtype == p.dtype
            and s.dtype == torch.float32
            and m.device == v.device == s.device == device
        ):
            return p, g, m, v, s
        p_ = self.dense(p)
        entry = (
            p_,
            self.like(g, p_, dtype=p.dtype),
            self.like(m, p_, write_back=True),
            self.like(v, p_, write_back=True),
            self.dense(s.reshape(()), dtype=torch.float32, device=device),
        )
        self.keep.extend(entry)
        return entry

    def online(self, t: OnlineTensors) -> OnlineTensors:
        """``t`` (r and c > 0) in the layout of the online-step kernels: the (r, c) tensors and
        ``col_energy`` contiguous (those the step updates written back by :meth:`finish`),
        ``state_step`` a dense fp32 tensor and ``mask`` a uint8 view, both on param's device.
        The caller's own tensors when they have that layout (the mask viewed as uint8: one byte a
        column, as bool); every copy is kept alive until :meth:`finish` (the kernels take
        addresses)."""
        device = t.param.device
        if self.online_ready(t):
            return t._replace(mask=t.mask.view(torch.uint8))
        staged = OnlineTensors(
            param=self.contiguous(t.param, write_back=True),
            grad=self.contiguous(t.grad, write_back=False),
            exp_avg=self.contiguous(t.exp_avg, write_back=True),
            exp_avg_sq=self.contiguous(t.exp_avg_sq, write_back=True),
            state_step=self.dense(t.state_step.reshape(()), dtype=torch.float32, device=device),
            w_prev=self.contiguous(t.w_prev, write_back=False),
            mask=t.mask.to(device).contiguous().view(torch.uint8),
            col_energy=self.contiguous(t.col_energy, write_back=True),
        )
        self.keep.extend(staged)
        return staged

    @staticmethod
    def online_ready(t: OnlineTensors) -> bool:
        """Whether :meth:`online` takes ``t`` as it is (no copy): every tensor contiguous,
        ``state_step`` fp32 and ``mask`` on param's device."""
        device = t.param.device
        return (
            t.state_step.dtype == torch.float32
            and t.state_step.device == device
            and t.mask.device == device
            and all(x.is_contiguous() for x in t)
        )

    def finish(self) -> None:
        for original, tmp in self._writebacks:
            original.copy_(tmp)
