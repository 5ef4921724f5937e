"""HPAOptimizer: AdamW steps plus the HPA task lifecycle (``begin_task`` / ``end_task``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import ops
from .config import HPAConfig
from .functional import LayerPlan, plan_layer_update
from .layers import ManagedLayer, find_hpa_layers

_GROUP_KEYS = frozenset({"params", "lr", "betas", "eps", "weight_decay", "maximize", "name", "initial_lr"})


@dataclass(frozen=True)
class LayerReport:
    """What ``end_task`` did to one layer (HPA_SPEC.md Steps 1–3).

    Attributes:
        retain_ratio: p_l.
        alpha: α_l.
        num_safety, num_task, num_shared: |S|, |T|, |O| (columns).
        num_retained: columns reverted to W_prev (at most ``floor(p_l·c + 0.5)``).
        num_columns: c, the layer's in_features.
        coef: c_l, the projection scalar removed along W_prev.
    """

    retain_ratio: float
    alpha: float
    num_safety: int
    num_task: int
    num_shared: int
    num_retained: int
    num_columns: int
    coef: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class HPAEditError(RuntimeError):
    """``end_task`` failed while writing; ``edited`` layers hold Ŵ, ``untouched`` layers W_new."""

    def __init__(self, message: str, edited: list[str], untouched: list[str]) -> None:
        super().__init__(f"{message}; edited layers: {edited}; untouched layers: {untouched}")
        self.edited = edited
        self.untouched = untouched


class HPAOptimizer(Optimizer):
    r"""AdamW with the HPA task lifecycle of HPA_SPEC.md, on fused kernels.

    Each ``step()`` is the AdamW update of ``torch.optim.AdamW``
    (decoupled weight decay, bias-corrected moments)::

        θ ← θ·(1 − γλ);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        θ ← θ − γ/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)

    with fp32 math and fp32 moments whatever the parameter dtype. Around each task:

    * ``begin_task(safety_hessians)`` snapshots W_prev of every managed layer and keeps its
      safety statistics ``hinv_s`` (HPA_SPEC.md Step 0, safety set on W_prev);
    * ``end_task(task_hessians)`` applies Steps 1–3 to every managed layer, in place, after
      checking every input (nothing is written when a check fails).

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``. Group keys other than
            ``lr``, ``betas``, ``eps``, ``weight_decay``, ``maximize``, ``name`` are refused.
        lr: learning rate γ (float, or a 0-d tensor a scheduler may change in place).
        betas: (β1, β2), each in [0, 1).
        eps: ε ≥ 0, added to the denominator.
        weight_decay: λ ≥ 0 (decoupled, as in AdamW).
        maximize: ascend instead of descend.
        hpa: :class:`HPAConfig`.
        hpa_layers: ``{name: ManagedLayer}`` of the layers to edit (:meth:`from_model` finds
            them); their weights must be among ``params``. ``None``: a plain AdamW.
        backend: kernels backend, ``"auto"`` or one of ``hpa_kernels.ops.available_backends()``.

    Raises:
        ValueError: a hyperparameter out of range, an unknown group key, a complex parameter,
            a managed weight that is not in ``params``, or an unknown backend.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf (AMP contract)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        hpa: HPAConfig | None = None,
        hpa_layers: Mapping[str, ManagedLayer] | None = None,
        backend: str = "auto",
    ) -> None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("HPAOptimizer: a tensor lr must have one element")
        if not float(lr) >= 0.0:
            raise ValueError(f"HPAOptimizer: invalid learning rate {float(lr)}")
        if not eps >= 0.0:
            raise ValueError(f"HPAOptimizer: invalid eps {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"HPAOptimizer: invalid betas {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"HPAOptimizer: invalid weight_decay {weight_decay}")
        ops.resolve_backend(backend, torch.device("cpu"))
        self.hpa = hpa if hpa is not None else HPAConfig()
        self.backend = backend
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)
        self.hpa_layers: dict[str, ManagedLayer] = dict(hpa_layers or {})
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for name, layer in self.hpa_layers.items():
            if id(layer.module.weight) not in owned:
                raise ValueError(f"HPAOptimizer: the weight of managed layer {name!r} is not among the params")
        self._in_task = False
        self._tasks_completed = 0

    @classmethod
    def from_model(cls, model: nn.Module, *, hpa: HPAConfig | None = None, **kwargs: Any) -> HPAOptimizer:
        """An HPAOptimizer over ``model``'s trainable parameters, managing its block ``nn.Linear`` layers.

        Managed layers: see :func:`hpa_kernels.layers.find_hpa_layers` (every ``nn.Linear`` inside
        the repeated blocks, plus ``hpa.extra_layers``). Every other trainable parameter gets plain
        AdamW steps and is never edited.

        Args:
            model: the model.
            hpa: :class:`HPAConfig` (default: the paper's).
            **kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``maximize``, ``backend``.

        Raises:
            ValueError: as :func:`find_hpa_layers`, or a managed layer whose weight is frozen.
        """
        hpa = hpa if hpa is not None else HPAConfig()
        layers = find_hpa_layers(model, hpa)
        for name, layer in layers.items():
            if not layer.module.weight.requires_grad:
                raise ValueError(f"HPAOptimizer.from_model: managed layer {name!r} has a frozen weight")
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, hpa=hpa, hpa_layers=layers, **kwargs)

    # ------------------------------------------------------------------ param groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = set(param_group) - _GROUP_KEYS
        if unknown:
            raise ValueError(
                f"HPAOptimizer: unknown param group keys {sorted(unknown)}; allowed: {sorted(_GROUP_KEYS)}"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for index, p in enumerate(params):
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(f"HPAOptimizer: parameter {index} of the group is complex ({p.dtype}); not supported")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state dict plus ``"hpa"``: the task lifecycle (plain values).

        Per-parameter state: ``step`` (fp32 0-d), ``exp_avg``, ``exp_avg_sq`` (fp32) and, during a
        task, ``hpa_prev`` (W_prev, the parameter's dtype) and ``hpa_hinv_safety`` (fp32 (c,)).
        """
        state = super().state_dict()
        state["hpa"] = {"in_task": self._in_task, "tasks_completed": self._tasks_completed}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`; tensors keep their saved dtype (fp32 moments
        stay fp32 over bf16 parameters) and move to their parameter's device."""
        state_dict = dict(state_dict)
        lifecycle = state_dict.pop("hpa", {"in_task": False, "tasks_completed": 0})
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        for saved_id, saved_state in state_dict["state"].items():
            param = by_id[saved_id]
            for key, value in saved_state.items():
                if isinstance(value, Tensor):
                    # torch's loader casts floating state to the parameter's dtype; undo that.
                    self.state[param][key] = value.to(device=param.device)
        self._in_task = bool(lifecycle["in_task"])
        self._tasks_completed = int(lifecycle["tasks_completed"])

    @property
    def in_task(self) -> bool:
        """True between ``begin_task`` and ``end_task``."""
        return self._in_task

    @property
    def tasks_completed(self) -> int:
        """How many tasks ``end_task`` has closed."""
        return self._tasks_completed

    # ------------------------------------------------------------------ the AdamW step

    def _check_grads(self) -> None:
        for group_index, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError(
                        f"HPAOptimizer does not support sparse gradients (parameter {index} of param group "
                        f"{group_index}{' ' + repr(group['name']) if 'name' in group else ''}, shape {tuple(p.shape)})"
                    )

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdamW step over every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss; called under ``torch.enable_grad()``.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            TypeError: a sparse gradient (before any state changes).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()  # every check before any state changes
        gathered = [self._init_group(group) for group in self.param_groups]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, (params, grads, exp_avgs, exp_avg_sqs, steps) in zip(self.param_groups, gathered):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            ops.adamw_step(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                backend=self.backend,
            )
        return loss

    # ------------------------------------------------------------------ the HPA task lifecycle

    def _check_statistics(self, kind: str, hessians: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        if hessians is None:
            raise ValueError(f"HPAOptimizer: {kind} is required while HPA is enabled")
        checked: dict[str, Tensor] = {}
        for name, layer in self.hpa_layers.items():
            if name not in hessians:
                raise ValueError(f"HPAOptimizer: {kind} has no entry for managed layer {name!r}")
            vec = hessians[name]
            columns = layer.module.in_features
            if not isinstance(vec, Tensor) or vec.shape != (columns,):
                shape = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
                raise ValueError(f"HPAOptimizer: {kind}[{name!r}] must be a ({columns},) tensor, got {shape}")
            if not bool(torch.isfinite(vec).all()):
                raise ValueError(f"HPAOptimizer: {kind}[{name!r}] holds NaN or Inf")
            if not bool((vec > 0).all()):
                raise ValueError(f"HPAOptimizer: {kind}[{name!r}] must be > 0 (a diagonal of an inverse Hessian)")
            checked[name] = vec
        return checked

    def _check_weights_finite(self) -> None:
        for name, layer in self.hpa_layers.items():
            if not bool(torch.isfinite(layer.module.weight).all()):
                raise ValueError(f"HPAOptimizer: the weight of managed layer {name!r} holds NaN or Inf")

    @torch.no_grad()
    def begin_task(self, safety_hessians: Mapping[str, Tensor] | None = None) -> None:
        """Start a task: snapshot W_prev of every managed layer and keep its safety statistics.

        Args:
            safety_hessians: ``{name: hinv_s}``, (in_features,) positive finite vectors, one per
                managed layer (``HessianCollector.hinv()`` on the safety set, on W_prev). May be
                ``None`` only when ``hpa.enabled`` is False.

        Raises:
            RuntimeError: a task is already open.
            ValueError: a missing layer, a wrong length, NaN/Inf or non-positive entries, or a
                non-finite weight. Nothing is stored when it raises.
        """
        if self._in_task:
            raise RuntimeError("HPAOptimizer.begin_task: a task is already open; call end_task first")
        if self.hpa.enabled:
            checked = self._check_statistics("safety_hessians", safety_hessians)
            self._check_weights_finite()
            for name, layer in self.hpa_layers.items():
                weight = layer.module.weight
                state = self.state[weight]
                state["hpa_prev"] = weight.detach().clone(memory_format=torch.contiguous_format)
                state["hpa_hinv_safety"] = checked[name].detach().to(device=weight.device, dtype=torch.float32).clone()
        self._in_task = True

    @torch.no_grad()
    def end_task(self, task_hessians: Mapping[str, Tensor] | None = None) -> dict[str, LayerReport]:
        """End the task: apply HPA_SPEC.md Steps 1–3 to every managed layer, in place.

        Every input is checked and every layer's selection computed before the first write; each
        layer is then written whole (computed aside, copied in), so a failure leaves every layer
        either fully edited or untouched (:class:`HPAEditError` says which).

        Args:
            task_hessians: ``{name: hinv_t}`` (``HessianCollector.hinv()`` on the task set, on
                W_new). May be ``None`` only when ``hpa.enabled`` is False.

        Returns:
            ``{name: LayerReport}``; empty when HPA is disabled.

        Raises:
            RuntimeError: no task is open.
            ValueError: missing, mis-shaped, non-finite or non-positive statistics, or a
                non-finite weight; no weight changes.
            HPAEditError: a failure while writing.
        """
        if not self._in_task:
            raise RuntimeError("HPAOptimizer.end_task: no task is open; call begin_task first")
        if not self.hpa.enabled:
            self._in_task = False
            self._tasks_completed += 1
            return {}
        checked = self._check_statistics("task_hessians", task_hessians)
        self._check_weights_finite()
        for name, layer in self.hpa_layers.items():
            if "hpa_prev" not in self.state[layer.module.weight]:
                raise RuntimeError(f"HPAOptimizer.end_task: no W_prev snapshot for {name!r} (state lost?)")
        plans: dict[str, LayerPlan] = {}
        for name, layer in self.hpa_layers.items():
            weight = layer.module.weight
            state = self.state[weight]
            plans[name] = plan_layer_update(
                state["hpa_prev"],
                weight.detach(),
                state["hpa_hinv_safety"],
                checked[name].to(device=weight.device, dtype=torch.float32),
                layer.retain_ratio,
                alpha_bounds=self.hpa.alpha_bounds,
                focus_multiplier=self.hpa.focus_multiplier,
                orthogonal=self.hpa.orthogonal,
                mode=self.hpa.selection,
                backend=self.backend,
            )
        self._write(plans)
        for layer in self.hpa_layers.values():
            state = self.state[layer.module.weight]
            del state["hpa_prev"], state["hpa_hinv_safety"]
        self._in_task = False
        self._tasks_completed += 1
        return {
            name: LayerReport(
                retain_ratio=layer.retain_ratio,
                alpha=update.alpha,
                num_safety=update.num_safety,
                num_task=update.num_task,
                num_shared=update.num_shared,
                num_retained=update.num_retained,
                num_columns=layer.module.in_features,
                coef=update.coef,
            )
            for (name, layer), update in zip(self.hpa_layers.items(), plans.values())
        }

    def _write(self, plans: Mapping[str, LayerPlan]) -> None:
        """Step 3's write, layer by layer: Ŵ is computed aside and copied in whole, so that a
        failure leaves each layer fully edited or untouched (one layer's copy at a time)."""
        edited: list[str] = []
        for name, plan in plans.items():
            weight = self.hpa_layers[name].module.weight.detach()
            try:
                edited_weight = ops.hpa_apply(
                    self.state[self.hpa_layers[name].module.weight]["hpa_prev"],
                    weight,
                    plan.mask,
                    plan.coef,
                    backend=self.backend,
                )
                weight.copy_(edited_weight)
            except Exception as error:
                untouched = [n for n in plans if n not in edited]
                raise HPAEditError(
                    f"HPAOptimizer.end_task failed writing {name!r}: {error}", edited, untouched
                ) from error
            edited.append(name)
