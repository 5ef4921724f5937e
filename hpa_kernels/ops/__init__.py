"""Kernel dispatch: one schema for the ops, one module per backend registering into it.

Backends:

* ``"torch"``  — :mod:`hpa_kernels.ops.torch_ref`, plain PyTorch, always available; the ground
  truth of every test.
* ``"cpu"``    — :mod:`hpa_kernels.ops.cpu`: csrc/cpu C++ (OpenMP) through :mod:`hpa_kernels._C`;
  CPU tensors.
* ``"cuda"``   — :mod:`hpa_kernels.ops.cuda`: csrc/cuda through :mod:`hpa_kernels._C_cuda` (raw
  pointers, current stream); CUDA tensors.
* ``"triton"`` — :mod:`hpa_kernels.ops.triton`; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported (tests). Imported on the first call
  that resolves to it.

Each op resolves ``backend`` for its tensors' device (:func:`resolve_backend`, cached), checks its
arguments once (:mod:`hpa_kernels.ops.schema`, the same checks and messages on every backend) and
calls that backend's kernels from :data:`hpa_kernels.ops.schema.REGISTRY`, which each backend
module fills when imported.

``backend="auto"`` picks, for the tensors' device: CPU → ``"cpu"`` when :mod:`hpa_kernels._C`
loaded, else ``"torch"``; CUDA → ``"triton"`` when importable, else ``"cuda"``, else ``"torch"``.
The environment variable ``HPA_KERNELS_BACKEND`` replaces ``"auto"`` by a backend name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import operator
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _native, schema
from . import cpu as cpu  # registers "cpu"
from . import cuda as cuda  # registers "cuda"
from . import torch_ref as torch_ref  # registers "torch"
from .schema import ROW_BLOCK as ROW_BLOCK  # the reduce order's block size, re-exported
from .schema import OnlineProjection as OnlineProjection  # online_step's projection, re-exported
from .schema import OnlineTensors as OnlineTensors  # online_steps' layers, re-exported

BACKENDS = ("torch", "cpu", "cuda", "triton")
_DEVICE_TYPES = {"torch": None, "cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def _triton_runs_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """Names of the backends this machine can run, ``"torch"`` first.

    ``"cpu"`` needs :mod:`hpa_kernels._C`; ``"cuda"`` needs :mod:`hpa_kernels._C_cuda` and a GPU;
    ``"triton"`` needs triton and a GPU, or ``TRITON_INTERPRET=1`` (CPU tensors, slow: tests only).
    """
    names = ["torch"]
    if _native.cpu_loaded():
        names.append("cpu")
    if _native.cuda_loaded():
        names.append("cuda")
    if _triton_importable() and (torch.cuda.is_available() or _triton_runs_on_cpu()):
        names.append("triton")
    return names


def _runs_on(backend: str, device: torch.device) -> bool:
    wanted = _DEVICE_TYPES[backend]
    if backend == "triton" and _triton_runs_on_cpu():
        return device.type in ("cpu", "cuda")
    return wanted is None or wanted == device.type


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """The concrete backend name for ``backend`` (``"auto"`` allowed) on ``device``.

    With ``device=None`` only the name and its availability are checked (``"auto"`` → ``"auto"``
    is not returned: it resolves as for a CPU device).

    Every op call resolves its ``backend``, so this is on the path of every step: the result is
    cached per (name, device), the name being ``HPA_KERNELS_BACKEND`` (read on every call) in
    place of ``"auto"``, and for ``"triton"`` also whether ``TRITON_INTERPRET=1``. What a backend
    needs (compiled modules, triton, a GPU) is fixed once :mod:`hpa_kernels.ops` is imported.
    Refusals are not cached: each call with a bad name or device raises again.

    Raises:
        ValueError: unknown backend name, one not available on this machine, or one that cannot run
            on ``device`` (e.g. ``"cuda"`` for CPU tensors).
    """
    if backend == "auto":
        backend = os.environ.get("HPA_KERNELS_BACKEND", "auto") or "auto"
    return _resolved(backend, device, backend == "triton" and _triton_runs_on_cpu())


# The caches key on (name, device, triton_on_cpu): the name after HPA_KERNELS_BACKEND replaced
# "auto", the device itself (torch.device hashes and compares by (type, index), cheaper than
# reading device.type, which builds a string), and for "triton" whether TRITON_INTERPRET=1 (it
# decides the devices triton runs on). An exception is not cached: refusals raise again.


@functools.cache
def _resolved(backend: str, device: torch.device | None, triton_on_cpu: bool) -> str:
    """:func:`resolve_backend` on a cache key (``triton_on_cpu`` only keys the cache)."""
    return _resolve(backend, device)


@functools.cache
def _kernels_for(backend: str, device: torch.device, triton_on_cpu: bool) -> schema.Kernels:
    """The registered kernels of the backend a cache key resolves to ("triton" imported on first use)."""
    name = _resolved(backend, device, triton_on_cpu)
    if name not in schema.REGISTRY:
        importlib.import_module(f".{name}", __name__)  # only "triton" is not imported with this package
    return schema.REGISTRY[name]


def _kernels(backend: str, device: torch.device) -> schema.Kernels:
    """The kernels that run ``backend`` (``"auto"`` allowed) on ``device``: one cache look-up."""
    if backend == "auto":
        backend = os.environ.get("HPA_KERNELS_BACKEND", "auto") or "auto"
    return _kernels_for(backend, device, backend == "triton" and _triton_runs_on_cpu())


def _resolve(backend: str, device: torch.device | None) -> str:
    """:func:`resolve_backend` uncached, ``backend`` already read from the environment for "auto"."""
    if backend == "auto":
        device_type = "cpu" if device is None else device.type
        if device_type == "cuda":
            available = available_backends()
            return next((name for name in ("triton", "cuda") if name in available), "torch")
        return "cpu" if device_type == "cpu" and _native.cpu_loaded() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown HPA kernels backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend not in available_backends():
        raise ValueError(f"HPA kernels backend {backend!r} is not available here; available: {available_backends()}")
    if device is not None and not _runs_on(backend, device):
        raise ValueError(f"HPA kernels backend {backend!r} cannot run on {device} tensors")
    return backend


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
    backend: str = "auto",
) -> None:
    """One AdamW step over lists of tensors, in place (the update of ``torch.optim.AdamW``).

    For each parameter ``p`` with gradient ``g`` (``g / grad_scale`` when given, ``-g`` when
    ``maximize``), moments ``m``, ``v`` and step count ``t`` (incremented first)::

        p ← p · (1 − lr·weight_decay)
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
        p ← p − lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)

    Args:
        params: parameters, any shape, fp32 / bf16 / fp16, all on one device.
        grads: gradients, same shapes and dtypes as ``params`` (any strides).
        exp_avgs, exp_avg_sqs: fp32 moments, same shapes as ``params``.
        state_steps: fp32 0-d step counts, one per parameter.
        lr, beta1, beta2, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.
        grad_scale: optional fp32 0-d tensor; gradients are divided by it (AMP unscaling).
        found_inf: optional fp32 0-d tensor; when non-zero nothing changes at all
            (parameters, moments, step counts), as ``torch.amp.GradScaler`` expects.
        backend: ``"auto"`` or one of :func:`available_backends`.

    Math is fp32 whatever the parameter dtype; the result is rounded once to it.

    Raises:
        ValueError / TypeError: lengths, shapes, devices or dtypes that do not match the above.
    """
    if not params:
        return
    kernels = _kernels(backend, params[0].device)
    tensors = schema.AdamWTensors(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    hyper = schema.AdamWHyper(lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf)
    schema.check_adamw_step(tensors, hyper, float64=kernels.float64)
    kernels.adamw_step(tensors, hyper)


def hpa_reduce(w_prev: Tensor, w_new: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The one pass over the weights of HPA_SPEC.md Step 1 (column energies) and Step 3
    (Frobenius sums).

    With ΔW = W_new − W_prev of shape (r, c)::

        col_energy[j] = Σᵢ ΔWᵢⱼ²                      (Step 1)
        dot = ⟨ΔW, W_prev⟩_F,   norm_sq = ‖W_prev‖_F²   (Step 3: c_l = dot / norm_sq)

    Step 1's column scores ε̄ⱼ = (col_energy[j] / r) / hinv_s[j] (ζ̄ⱼ with hinv_t) are
    :func:`hpa_kernels.functional.column_scores_from_energy` of ``col_energy``: the sums stay
    unrounded, so the scores are rounded once, and the sums of row shards add up
    (:func:`hpa_kernels.distributed.plan_sharded_layers`).

    Args:
        w_prev, w_new: (r, c) weights (out_features, in_features), same dtype, any strides.

    Returns:
        ``(col_energy, dot, norm_sq)``: float64 (c,), float32 0-d, float32 0-d; r = 0 gives zeros.

    One summation order, the same bits on every backend, thread count, tile size, GPU and SM
    count (so every backend and rank ranks the same columns, HPA_SPEC.md Step 2 ties): in float64,
    with d = W_new − W_prev widened exactly from the storage dtype and every product and sum one
    IEEE operation (no FMA contraction),

    1. rows in blocks of :data:`ROW_BLOCK` = 128; each block's d², d·w, w² summed per column by
       the adjacent-pair binary tree (:func:`hpa_kernels.ops.torch_ref.pairwise_sum`, rows past r
       count as zeros);
    2. the block sums of each column added in block index order → E_j, D_j, N_j;
    3. ``col_energy[j] = E_j`` (not rounded); ``dot = fl32(tree over j of D_j)``,
       ``norm_sq = fl32(tree over j of N_j)``.

    float64 error ~ log2(r)·2⁻⁵³ relative to the sum of |terms|, so ``dot`` and ``norm_sq`` are
    within one float32 ulp of their exact values except where the sums cancel (``dot``).

    Raises:
        ValueError / TypeError: shapes, devices or dtypes that do not match the above.
    """
    kernels = _kernels(backend, w_new.device)
    schema.check_hpa_reduce(w_prev, w_new, float64=kernels.float64)
    return kernels.hpa_reduce(w_prev, w_new)


def hpa_apply(
    w_prev: Tensor,
    w_new: Tensor,
    mask: Tensor,
    coef: float | Tensor,
    out: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """HPA_SPEC.md Step 3's write, in one pass::

        Ŵ[:, j] = W_prev[:, j]                 if mask[j]
        Ŵ[:, j] = W_new[:, j] − coef·W_prev[:, j]   otherwise   (fp32 math)

    Args:
        w_prev, w_new: (r, c), same dtype.
        mask: (c,) bool, True for retained columns (their result is bit-equal to ``w_prev``).
        coef: the projection scalar c_l (Python float or 0-d tensor).
        out: optional (r, c) destination of ``w_new``'s dtype; may be ``w_new`` itself (in place).

    Returns:
        Ŵ, of ``w_new``'s dtype (``out`` when given).

    Raises:
        ValueError / TypeError: shapes, devices or dtypes that do not match the above.
    """
    kernels = _kernels(backend, w_new.device)
    schema.check_hpa_apply(w_prev, w_new, mask, out, float64=kernels.float64)
    return kernels.hpa_apply(w_prev, w_new, mask, coef, out)


def online_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    state_step: Tensor,
    w_prev: Tensor,
    mask: Tensor,
    col_energy: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    projection: OnlineProjection | None = None,
    backend: str = "auto",
    orthogonal: bool | None = None,
) -> Tensor:
    """One training step of a managed layer in HPA's online mode, in place.

    With W the parameter before the step, W_prev the task's snapshot, M the column mask
    (True = retained, HPA_SPEC.md Step 2) and W_a the AdamW result of :func:`adamw_step` on W,
    every mode first does the AdamW update of ``m``, ``v``, ``state_step`` and
    ``col_energy[j] += Σᵢ (W_a − W)ᵢⱼ²`` (fp32) — the energy of the *unconstrained* update,
    retained columns included, summed over steps, for the next mask refresh (Step 1's ε̄ⱼ with
    col_energy in place of Σᵢ ΔWᵢⱼ²: :func:`hpa_kernels.functional.column_scores_from_energy`,
    as offline) — and writes W ← W_prev on retained columns. On the free columns (~M), with
    ΔW = W − W_prev of the values written and sums over the free columns only:

    * ``projection.exact`` (the default; Step 3 restricted to the free columns), two passes.
      **Pass 1** (reads W, g, m, v, W_prev; writes W, m, v) writes W ← round(W_a) and sums
      ⟨ΔW, W_prev⟩ and ‖W_prev ⊙ (1 − M)‖²; **pass 2** (reads W, W_prev; writes W; only when
      c' ≠ 0) writes ``W[:, ~M] −= c'·W_prev[:, ~M]`` with
      ``c' = ⟨ΔW, W_prev⟩_F / ‖W_prev ⊙ (1 − M)‖_F²`` (0 when that norm is 0). Two passes, not
      one: c' is a sum over the whole matrix of values pass 1 produces, so no element can be
      written in its final form before all of them are read. Returns c'.
    * ``projection.lagged``, one pass (the streams of pass 1): W ← round(W_a − c_prev·W_prev)
      with c_prev = ``projection.coef`` (the coefficient the previous lagged step returned),
      summing over the values just written ``dot = ⟨ΔW, W_prev⟩`` and
      ``norm_sq = ‖W_prev ⊙ (1 − M)‖²``. Returns ``c_next = dot / norm_sq`` (0 when norm_sq
      is 0), for the caller to pass as the next step's ``coef``: the component c_next·W_prev
      of this step's ΔW is removed by the next step. With c_prev = 0 the step is pass 1 of the
      exact mode, and returns its c'.
    * ``projection.orthogonal=False``: one pass, W ← round(W_a); returns 0.

    Invariants after every step (tested), up to rounding as stated:

    * retained columns are bit-equal to ``w_prev`` (its raw bits are copied);
    * exact: |⟨ΔW, W_prev⟩_F| ≤ u·‖W‖_F·‖W_prev‖_F + (fp32 accumulation error), u the unit
      roundoff of the parameter's dtype: the projection is exact up to the final rounding of W.
      In fp32 this gives |⟨ΔW, W_prev⟩| ≤ 1e-5·‖ΔW‖·‖W_prev‖ once ‖ΔW‖ is not at the rounding
      floor of W (checked in the tests); in bf16 / fp16 only the rounding bound holds. Each step
      re-projects the whole ΔW, so rounding residue does not accumulate over steps.
    * lagged: ⟨ΔW[:, ~M] − c_next·W_prev[:, ~M], W_prev[:, ~M]⟩ = 0 up to the fp32 accumulation
      error of the sums (c_next is their ratio): ΔW is orthogonal to W_prev except for the
      component c_next·W_prev that the next step removes. ``end_task``'s edit re-projects
      exactly, so a task's final weights satisfy Step 3's invariant in full.

    Moments keep following the gradient on retained columns (so a column released at the next
    mask refresh continues from its true moments). A non-zero ``found_inf`` leaves every tensor
    argument bitwise unchanged (``torch.amp.GradScaler`` skip) and returns c_prev (lagged) or 0.

    Args:
        param: (r, c) weight (out_features, in_features), fp32 / bf16 / fp16; updated in place.
        grad: (r, c), param's dtype, any strides.
        exp_avg, exp_avg_sq: (r, c) fp32 moments.
        state_step: fp32 one-element step count, incremented.
        w_prev: (r, c) snapshot of the task's start, param's dtype.
        mask: (c,) bool, True for retained columns.
        col_energy: (c,) fp32 accumulator, updated in place.
        lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf: as :func:`adamw_step`.
        projection: the mode and, lagged, c_prev (:class:`OnlineProjection`, from
            ``HPAConfig.orthogonal`` and ``HPAConfig.online_projection``); ``None``: exact.
        backend: ``"auto"`` or one of :func:`available_backends`.
        orthogonal: deprecated (removed in the next release; a ``DeprecationWarning``): the
            former keyword, ``OnlineProjection(orthogonal=orthogonal)``.

    Returns:
        c' (exact), c_next (lagged) or 0, a float32 0-d tensor on param's device; no host sync
        on CUDA.

    Raises:
        ValueError / TypeError: shapes, devices or dtypes that do not match the above, or both
            ``projection`` and ``orthogonal``.
    """
    if orthogonal is not None:
        if projection is not None:
            raise TypeError("online_step: pass projection only (orthogonal= is its former, deprecated form)")
        warnings.warn(
            "online_step(orthogonal=...) is deprecated: pass projection=OnlineProjection(orthogonal=...) "
            "(removed in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        projection = OnlineProjection(orthogonal=bool(orthogonal))
    kernels = _kernels(backend, param.device)
    tensors = schema.OnlineTensors(param, grad, exp_avg, exp_avg_sq, state_step, w_prev, mask, col_energy)
    hyper = schema.AdamWHyper(lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf)
    if projection is None:
        projection = OnlineProjection()
    schema.check_online_step(tensors, hyper, projection, float64=kernels.float64)
    return kernels.online_step(tensors, hyper, projection)


def online_steps(
    layers: Sequence[schema.OnlineTensors],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    projections: Sequence[OnlineProjection] | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`online_step` of several managed weights in one call: the same results, bit for bit,
    as one :func:`online_step` call per layer with the same hyperparameters, in any order.

    ``"cpu"`` steps all layers of one storage dtype and projection mode in one native call (one
    OpenMP region over every layer's rows); the other backends call their single-layer kernels
    once per layer.

    Args:
        layers: one :class:`OnlineTensors` per weight (``param``, ``grad``, ``exp_avg``,
            ``exp_avg_sq``, ``state_step``, ``w_prev``, ``mask``, ``col_energy`` as the arguments
            of :func:`online_step`), all on one device, any of the storage dtypes; distinct tensors.
        lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf: as :func:`online_step`,
            shared by every layer.
        projections: one :class:`OnlineProjection` per layer (each with its own lagged c_prev);
            ``None``: exact for all.
        backend: ``"auto"`` or one of :func:`available_backends`.

    Returns:
        (n,) float32 on the layers' device: entry k is what :func:`online_step` returns for
        ``layers[k]`` (c', c_next or 0); empty for no layers.

    Raises:
        ValueError / TypeError: a layer :func:`online_step` refuses (its message, prefixed with the
            layer's index), layers on more than one device, or projections not one per layer.
    """
    layers = list(layers)
    projections = [OnlineProjection()] * len(layers) if projections is None else list(projections)
    if not layers:
        if projections:
            raise ValueError(f"online_steps: 0 layers but {len(projections)} projections")
        return torch.zeros(0, dtype=torch.float32)
    kernels = _kernels(backend, layers[0].param.device)
    hyper = schema.AdamWHyper(lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf)
    schema.check_online_steps(layers, hyper, projections, float64=kernels.float64)
    return kernels.online_steps(layers, hyper, projections)


_TENSORS_ONLY = schema.AdamWHyper(0.0, 0.0, 0.0, 0.0, 0.0)  # no GradScaler tensors: checks of the tensors alone
_SHAPE, _DTYPE, _DEVICE = operator.attrgetter("shape"), operator.attrgetter("dtype"), operator.attrgetter("device")


class StalePlanError(RuntimeError):
    """A tensor an :class:`OnlineStepsPlan` holds is no longer where or as the plan found it (its
    storage or strides replaced: ``param.data = ...``, ``set_``): the plan did nothing; build a
    new one."""


class OnlineStepsPlan:
    """:func:`online_steps` prepared once for layers whose tensors other than the gradients stay
    the same from step to step, as a training loop's weights, moments, step counts, W_prev,
    masks and energies do: everything but the gradients is checked and staged at construction,
    so each :meth:`step` checks only the gradients (and that the held tensors have not moved).

    Each :meth:`step` gives, bit for bit, what :func:`online_steps` gives on ``layers`` with its
    ``grads`` and ``projections``, and writes each lagged layer's c_next into that layer's
    ``projection.coef`` in place: the next step applies it (the lagged invariant of
    :func:`online_step`, kept without a copy). ``"cpu"`` builds its native tables once here;
    the other backends call their :func:`online_steps` from :meth:`step`.

    Args:
        layers: one :class:`OnlineTensors` per weight, as :func:`online_steps` takes them, with
            the gradients of the first step (any later step brings its own).
        projections: one :class:`OnlineProjection` per layer (``None``: exact for all); a lagged
            one's ``coef`` must be a float32 one-element contiguous tensor on the layers' device
            (read as c_prev, then overwritten with c_next, by every step).
        backend: ``"auto"`` or one of :func:`available_backends`, resolved here once.

    Raises:
        ValueError / TypeError: what :func:`online_steps` raises for these arguments, no layers,
            or a lagged ``coef`` that is not such a tensor.
    """

    def __init__(
        self,
        layers: Sequence[schema.OnlineTensors],
        projections: Sequence[OnlineProjection] | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("OnlineStepsPlan: no layers")
        projections = [OnlineProjection()] * len(layers) if projections is None else list(projections)
        self.device = layers[0].param.device
        self._kernels = _kernels(backend, self.device)
        schema.check_online_steps(layers, _TENSORS_ONLY, projections, float64=self._kernels.float64)
        for k, projection in enumerate(projections):
            coef = projection.coef
            if projection.lagged and not (
                isinstance(coef, Tensor) and coef.dtype == torch.float32 and coef.numel() == 1 and coef.is_contiguous()
            ):
                raise ValueError(f"OnlineStepsPlan: layers[{k}]: a lagged coef must be a float32 one-element tensor")
        self._layers = layers
        self._projections = projections
        # What each step's gradients must match: the params' shapes, dtypes and device.
        self._grad_specs = (
            [t.param.shape for t in layers],
            [t.param.dtype for t in layers],
            [self.device] * len(layers),
        )
        # Held tensors, checked by stale(): every one's address, the (r, c) ones' strides too.
        self._held = [
            x for t, p in zip(layers, projections) for x in (*t[:1], *t[2:], *((p.coef,) if p.lagged else ()))
        ]
        self._matrices = [x for t in layers for x in (t.param, t.exp_avg, t.exp_avg_sq, t.w_prev)]
        self._layouts = self._layout()
        # The storages the plan's addresses point into, kept alive: a held tensor given another
        # storage never leaves the plan writing freed memory, checked or not.
        self._storages = [x.untyped_storage() for x in self._held]
        plan = self._kernels.plan_online_steps
        self._step = (plan and plan(layers, projections)) or self._calls

    def __len__(self) -> int:
        return len(self._layers)

    def step(
        self,
        grads: Sequence[Tensor],
        *,
        lr: float | Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        maximize: bool = False,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        check: bool = True,
    ) -> Tensor:
        """One online step of the plan's layers with ``grads``, in place (:class:`OnlineStepsPlan`).

        Args:
            grads: one gradient per layer, in the plan's order: its param's shape, dtype and
                device, any strides.
            lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf: as
                :func:`online_step`, shared by every layer.
            check: run :meth:`stale` first (reads every held tensor's address and strides:
                about 0.4 µs a tensor when they are out of cache, as after a forward and backward
                pass). ``False`` is for a caller that knows its tensors stay put; a tensor that did
                move is then not followed (the step writes the storage the plan was built on,
                which the plan keeps alive, so never freed memory).

        Returns:
            (n,) float32 on the layers' device: each layer's c', c_next or 0, as :func:`online_steps`.

        Raises:
            ValueError / TypeError: a gradient that does not fit its layer (the message of
                :func:`online_steps`), or not one per layer.
            StalePlanError: with ``check``, a held tensor moved; nothing was written.
        """
        grads = list(grads)
        if len(grads) != len(self._layers):
            raise ValueError(f"OnlineStepsPlan.step: {len(self._layers)} layers but {len(grads)} grads")
        shapes, dtypes, devices = self._grad_specs
        if (
            list(map(_SHAPE, grads)) != shapes
            or list(map(_DTYPE, grads)) != dtypes
            or list(map(_DEVICE, grads)) != devices
        ):
            layers = [t._replace(grad=g) for t, g in zip(self._layers, grads)]
            schema.check_online_steps(layers, _TENSORS_ONLY, self._projections, float64=self._kernels.float64)
        if check and self.stale():
            raise StalePlanError("OnlineStepsPlan.step: a held tensor's storage was replaced; build a new plan")
        hyper = schema.AdamWHyper(lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf)
        schema.check_scalars(hyper)
        return self._step(grads, hyper)

    def stale(self) -> bool:
        """Whether a tensor the plan holds is no longer where or as it was: another address or
        other strides (:class:`StalePlanError`)."""
        return self._layout() != self._layouts

    def _layout(self) -> tuple[list[int], list[tuple[int, ...]]]:
        return list(map(Tensor.data_ptr, self._held)), list(map(Tensor.stride, self._matrices))

    def _calls(self, grads: list[Tensor], hyper: schema.AdamWHyper) -> Tensor:
        """The step through the backend's :func:`online_steps` (its c_next copied into the lagged
        layers' coefficient tensors)."""
        layers = [t._replace(grad=g) for t, g in zip(self._layers, grads)]
        coefs = self._kernels.online_steps(layers, hyper, self._projections)
        lagged = [k for k, p in enumerate(self._projections) if p.lagged]
        if lagged:  # views of coefs (no index tensor, no host sync)
            torch._foreach_copy_([self._projections[k].coef for k in lagged], [coefs[k] for k in lagged])
        return coefs
