"""HPAOptimizer: AdamW steps plus the HPA task lifecycle (``begin_task`` / ``end_task``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import adapters, online, ops, optim_state, optim_step
from .config import HPAConfig
from .edit import (
    HPAEditError,
    check_statistics,
    check_task_support,
    check_weights_finite,
    plan_edits,
    snapshot_layers,
    write_edits,
)
from .functional import LayerReport
from .layers import ManagedLayer, find_hpa_layers

__all__ = ["HPAEditError", "HPAOptimizer", "LayerReport"]


def _renamed(method: str, name: str, value: Any, old_name: str, old_value: Any) -> Any:
    """``value``, or ``old_value`` passed under the argument's former name (a ``DeprecationWarning``).

    Raises:
        TypeError: both names given.
    """
    if old_value is None:
        return value
    if value is not None:
        raise TypeError(f"HPAOptimizer.{method}: pass {name} only ({old_name} is its former name)")
    warnings.warn(
        f"HPAOptimizer.{method}({old_name}=...) is deprecated: pass {name}=... (removed in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


# Attributes of HPAOptimizer kept by copy.deepcopy and pickle besides torch.optim.Optimizer's own.
_PICKLED_ATTRS = ("hpa", "backend", "hpa_layers", "_edited", "_in_task", "_tasks_completed", "_online_steps")


def _module_weight(layer: ManagedLayer) -> Tensor:
    """``layer.module.weight``, read from the module's parameters where it is one (no
    ``nn.Module.__getattr__``: this runs for every managed layer at every online step)."""
    weight = layer.module._parameters.get("weight")
    return weight if weight is not None else layer.module.weight


class _OnlineCache(NamedTuple):
    """HPAOptimizer's online plan: kept while the managed weights with a gradient (``key``: their
    ids) and what the plan captured (``fingerprint``) stay the same."""

    key: tuple[int, ...]
    ids: frozenset[int]  # the key as a set: the plain step skips these weights
    weights: list[Tensor]
    fingerprint: tuple | None
    batches: list[online.OnlineBatch] | None  # None until the first step plans them


class HPAOptimizer(Optimizer):
    r"""AdamW with the HPA task lifecycle of HPA_SPEC.md, on fused kernels.

    Each ``step()`` is the AdamW update of ``torch.optim.AdamW``
    (decoupled weight decay, bias-corrected moments)::

        θ ← θ·(1 − γλ);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        θ ← θ − γ/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)

    with fp32 math and fp32 moments whatever the parameter dtype. Around each task:

    * ``begin_task(hinv_safety)`` snapshots W_prev of every managed layer and keeps its
      safety statistics ``hinv_s`` (HPA_SPEC.md Step 0, safety set on W_prev);
    * ``end_task(hinv_task)`` applies Steps 1–3 to every managed layer, in place, after
      checking every input (nothing is written when a check fails).

    **Low precision.** Without master weights a bf16 / fp16 parameter is the only copy: each step
    computes θ − update in fp32 and rounds it once to the parameter's dtype, so an update smaller
    than half a unit in the last place of θ (bf16 near 1.0: 2⁻⁹ ≈ 0.002; with lr = 1e-5 every
    step of a weight of magnitude ≳ 0.005) is rounded away and *lost* — the parameter does not
    move at all. ``master_weights=True`` keeps an fp32 copy of every bf16 / fp16 parameter in its
    state (``"master_param"``): steps update the copy and the parameter is its rounding, so small
    updates accumulate. The HPA snapshot and edit then act on the fp32 copy (W_prev, W_new and Ŵ
    in fp32; the parameter receives round(Ŵ)). Write such parameters only through the optimizer
    (or load a state dict): a write to the parameter alone is overwritten by the next step.
    fp16 parameters are safe with ``eps=1e-8``: the math is fp32, so ε never underflows.

    **torch.compile.** ``step`` is excluded from tracing (``torch._disable_dynamo``): its kernels
    take raw pointers or read scalars on the host, which dynamo cannot trace. Inside a compiled
    function the call is a graph break and runs eagerly; the learning rate (float or tensor)
    never enters a graph, so a schedule causes no recompilation. ``fullgraph=True`` around a
    call of ``step`` is therefore refused by dynamo.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups, as for
            ``torch.optim.AdamW``. Group keys other than ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``maximize``, ``master_weights``, ``name``, ``param_names`` and the
            keys torch's schedulers add (``initial_lr``, ``max_lr``, ``min_lr``, ``base_momentum``,
            ``max_momentum``, ``swa_lr``) are refused. A tensor listed twice (tied weights passed
            by hand) is refused: stepping it twice would apply two AdamW updates per step.
        lr: learning rate γ (float, or a 0-d tensor a scheduler may change in place).
        betas: (β1, β2), each in [0, 1).
        eps: ε ≥ 0, added to the denominator.
        weight_decay: λ ≥ 0 (decoupled, as in AdamW).
        maximize: ascend instead of descend.
        master_weights: keep an fp32 copy of every bf16 / fp16 parameter (see *Low precision*).
            ``None`` (default) means False, with a warning when a trainable parameter is bf16 /
            fp16; pass False to choose rounding explicitly.
        hpa: :class:`HPAConfig`.
        hpa_layers: ``{name: ManagedLayer}`` of the layers to edit (:meth:`from_model` finds
            them); their weights must be among ``params``. ``None``: a plain AdamW.
        backend: kernels backend, ``"auto"`` or one of ``hpa_kernels.ops.available_backends()``.

    Raises:
        ValueError: a hyperparameter out of range, an unknown group key, a complex or
            non-floating-point parameter (named), a tensor listed twice (named), a managed weight
            that is not in ``params``, or an unknown backend.

    ``copy.deepcopy`` and ``pickle`` give a working optimizer: its HPA configuration, managed
    layers (copied with their weights, as the parameters are) and task lifecycle come along.
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
        master_weights: bool | None = None,
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
        ops.resolve_backend(backend)
        self.hpa = hpa if hpa is not None else HPAConfig()
        self.backend = backend
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "master_weights": bool(master_weights),
        }
        self._param_names: dict[int, str] = {}  # id(param) -> name, for error messages
        self._edited: dict[str, LayerReport] = {}  # layers end_task already wrote (a retry skips them)
        super().__init__(params, defaults)
        if master_weights is None and any(
            p.dtype in optim_step.LOW_PRECISION and p.requires_grad for g in self.param_groups for p in g["params"]
        ):
            warnings.warn(
                "HPAOptimizer: bf16/fp16 parameters without master weights: an update below half a unit in "
                "the last place of a weight is rounded away at every step (lost). Pass master_weights=True to "
                "keep fp32 copies, or master_weights=False to choose rounding explicitly.",
                UserWarning,
                stacklevel=2,
            )
        self.hpa_layers: dict[str, ManagedLayer] = dict(hpa_layers or {})
        for name, layer in self.hpa_layers.items():
            self._param_names.setdefault(id(layer.module.weight), f"{name}.weight")
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for name, layer in self.hpa_layers.items():
            if id(layer.module.weight) not in owned:
                raise ValueError(f"HPAOptimizer: the weight of managed layer {name!r} is not among the params")
        self._in_task = False
        self._tasks_completed = 0
        self._online_steps = 0  # steps of the open task taken in online mode (for refresh_every)
        self._online_cache: _OnlineCache | None = None  # the online step's plan

    @classmethod
    def from_model(cls, model: nn.Module, *, hpa: HPAConfig | None = None, **kwargs: Any) -> HPAOptimizer:
        """An HPAOptimizer over ``model``'s trainable parameters, managing the linear layers of its
        language model's repeated blocks.

        Managed layers (:func:`hpa_kernels.layers.find_hpa_layers`), the same rule for every family:

        * by default, every linear layer (``nn.Linear``, GPT-2's ``Conv1D``) inside the repeated
          blocks of the **language model** — a decoder-only or encoder-only model, both stacks of an
          encoder-decoder, the text decoder of a multimodal model — with the depth l of L counted
          within its own stack (``retention_schedule``);
        * the vision tower, the projector, the heads and any other linear layer only on request:
          ``hpa.include`` (``fnmatch`` patterns, e.g. ``"*vision_tower*"``; tower blocks keep their
          own stack's depth) or ``hpa.extra_layers`` (exact names); ``hpa.exclude`` patterns remove
          layers and win over every other rule;
        * frozen layers (``requires_grad=False``) are skipped, with a warning, unless named in
          ``include`` / ``extra_layers``: a named frozen layer joins the optimizer without gradients
          (never stepped, edited at ``end_task``);
        * a ``Conv1D`` (weight stored (in_features, out_features)) is handled by its input
          features: HPA's columns are always the layer's inputs, so its edit is the edit of the
          equivalent ``nn.Linear``;
        * weights that are not linear layers (fused 3-D MoE expert weights, routers, convolutions)
          are never managed; when the language model's blocks hold some, a warning names them.
          A model where nothing is managed warns with the reason.

        Every other trainable parameter gets plain AdamW steps and is never edited.

        Args:
            model: the model.
            hpa: :class:`HPAConfig` (default: the paper's).
            **kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``maximize``, ``master_weights``,
                ``backend``.

        PEFT LoRA models: the managed layer is each wrapper's ``base_layer``; its frozen weight
        joins the optimizer without gradients (edited at ``end_task``, never stepped) and the
        adapters are trained (:mod:`hpa_kernels.adapters`). Layers PEFT froze without an adapter
        are skipped (their update is zero, so is their edit) unless named.

        Raises:
            ValueError: as :func:`find_hpa_layers`, or a wrapper that is not plain PEFT LoRA (DoRA,
                LoRA bias, other tuners).
        """
        hpa = hpa if hpa is not None else HPAConfig()
        layers = find_hpa_layers(model, hpa)  # frozen layers are there only when named (or LoRA bases)
        for name, layer in layers.items():
            if layer.adapter is not None:
                adapters.check_adapter(layer.adapter, name)
        params = [p for p in model.parameters() if p.requires_grad]
        params += [layer.module.weight for layer in layers.values() if not layer.module.weight.requires_grad]
        names = {id(p): name for name, p in model.named_parameters()}
        for p in params:
            optim_state.check_param_dtype(p, f"parameter {names.get(id(p), '?')!r}")
        optimizer = cls(params, hpa=hpa, hpa_layers=layers, **kwargs)
        optimizer._param_names.update(names)
        return optimizer

    # ------------------------------------------------------------------ param groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(optim_state.checked_param_group(param_group))
        self._online_cache = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in _PICKLED_ATTRS})
        # Names are keyed by id(); carry them with their tensors so the copy re-keys them.
        params = {id(p): p for group in self.param_groups for p in group["params"]}
        state["_named_params"] = [(params[key], name) for key, name in self._param_names.items() if key in params]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        named = state.pop("_named_params", [])
        super().__setstate__(state)
        self._online_cache = None
        self._param_names = {id(p): name for p, name in named}

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state dict plus ``"hpa"``: the task lifecycle (plain values).

        Per-parameter state: ``step`` (fp32 0-d), ``exp_avg``, ``exp_avg_sq`` (fp32; float64 for
        float64 parameters, which only the ``"torch"`` backend steps) and, during a
        task, ``hpa_prev`` (W_prev, the parameter's dtype) and ``hpa_hinv_safety`` (fp32 (c,));
        with master weights, ``master_param`` (fp32); in online mode, ``hpa_mask`` (bool (c,)),
        ``hpa_col_energy`` (fp32 (c,)) and ``hpa_online_coef`` (fp32 0-d, the lagged projection's
        pending coefficient). ``"hpa"`` also counts the online steps, lists, as plain dicts, the
        layers a failed ``end_task`` already edited (``"edited"``), so a resumed retry skips them,
        and holds the :class:`HPAConfig` as plain values (``"config"``; a load into an optimizer
        with another config warns, naming the fields, and keeps the optimizer's own).
        """
        state = super().state_dict()
        state["hpa"] = {
            "in_task": self._in_task,
            "tasks_completed": self._tasks_completed,
            "online_steps": self._online_steps,
            "edited": {name: report.as_dict() for name, report in self._edited.items()},
            "config": optim_state.config_values(self.hpa),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict` (e.g. from ``torch.load(..., weights_only=True)``).

        Tensors are copied (the optimizer never shares storage with ``state_dict``), keep their
        saved dtype (fp32 moments and master weights stay fp32 over bf16 parameters, snapshots keep
        theirs, masks stay bool) and move to their parameter's device. Moments saved in a lower
        precision (a ``torch.optim.AdamW`` state over bf16 parameters) are widened to fp32, which the
        kernels need; a ``step`` saved as a number becomes an fp32 0-d tensor.

        Param groups of a ``torch.optim.AdamW`` state dict load when their extra keys ask for
        nothing different (``amsgrad=False``, any ``foreach`` / ``fused``, ...); those keys are
        dropped, and a key the saved groups lack (``master_weights``) takes this optimizer's default.

        Raises:
            ValueError: a saved tensor whose shape does not fit its parameter (named), or a saved
                param group asking for an option HPAOptimizer does not implement (``amsgrad=True``,
                another optimizer's ``momentum``, ...); nothing is loaded then. Mismatched group
                sizes raise as in ``torch.optim.Optimizer``.
        """
        state_dict = dict(state_dict)
        optim_state.check_saved_groups(state_dict["param_groups"])
        lifecycle = optim_state.saved_lifecycle(state_dict, self._tasks_completed)
        changed = optim_state.config_differences(lifecycle.get("config"), self.hpa)
        if changed:
            warnings.warn(
                "HPAOptimizer.load_state_dict: the state was saved under another HPAConfig; this optimizer "
                f"keeps its own ({'; '.join(changed)})",
                UserWarning,
                stacklevel=2,
            )
        state_dict.pop("hpa", None)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        columns_of = {id(layer.module.weight): (layer.in_features,) for layer in self.hpa_layers.values()}
        optim_state.check_saved_state(state_dict["state"], by_id, columns_of, self._param_names)
        super().load_state_dict(state_dict)
        self._online_cache = None
        optim_state.restore_groups(self.param_groups, self.defaults)
        optim_state.restore_state(self.state, state_dict["state"], by_id)
        self._in_task = bool(lifecycle["in_task"])
        self._tasks_completed = int(lifecycle["tasks_completed"])
        self._online_steps = int(lifecycle.get("online_steps", 0))
        self._edited = {name: LayerReport(**report) for name, report in lifecycle.get("edited", {}).items()}
        if self._in_task and self.hpa.online:
            for layer in self.hpa_layers.values():  # a state without a pending lagged coefficient has none
                weight = layer.module.weight
                self.state[weight].setdefault("hpa_online_coef", torch.zeros((), device=weight.device))

    @property
    def in_task(self) -> bool:
        """True between ``begin_task`` and ``end_task``."""
        return self._in_task

    @property
    def tasks_completed(self) -> int:
        """How many tasks ``end_task`` has closed."""
        return self._tasks_completed

    # ------------------------------------------------------------------ the AdamW step

    @torch._disable_dynamo  # deliberate: see "torch.compile" in the class docstring
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdamW step over every parameter with a gradient (a parameter whose ``grad`` is
        ``None`` is not touched: no decay, no state change). Under ``torch.amp.GradScaler``
        gradients are unscaled here, once (not again after ``scaler.unscale_``), and a step with
        an inf/NaN gradient changes nothing.

        Args:
            closure: re-evaluates the model and returns the loss; called under ``torch.enable_grad()``.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            TypeError: a sparse or complex gradient, or a parameter dtype the backend cannot step,
                naming the parameter (before any state changes).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        optim_step.check_grads(self.param_groups, self.backend, self._param_names)  # before any state changes
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip = self._online_ids()
        gathered = [optim_step.gather_group(group, self.state, skip) for group in self.param_groups]
        for group, (params, grads, exp_avgs, exp_avg_sqs, steps, masters) in zip(self.param_groups, gathered):
            if not params:
                continue
            ops.adamw_step(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                **optim_state.adamw_hyperparameters(group),
                grad_scale=grad_scale,
                found_inf=found_inf,
                backend=self.backend,
            )
            for p, master in masters:
                p.copy_(master)  # the parameter is the rounding of its fp32 master copy
        if skip:
            self._online_step(grad_scale, found_inf)
        return loss

    def _online_ids(self) -> frozenset[int]:
        """The ids of the managed weights the online step handles (those with a gradient, in
        online mode's tasks; the plain AdamW step skips them). The online step's plan
        (:meth:`_online_batches`) is kept while they stay the same."""
        if not (self.hpa.enabled and self.hpa.online and self._in_task):
            return frozenset()
        weights = [w for w in map(_module_weight, self.hpa_layers.values()) if w.grad is not None]
        key = tuple(map(id, weights))
        cached = self._online_cache
        if cached is None or cached.key != key:
            cached = self._online_cache = _OnlineCache(key, frozenset(key), weights, None, None)
        return cached.ids

    def _online_batches(self) -> list[online.OnlineBatch]:
        """The online step's batches (:func:`online.plan_online_batches`) of :meth:`_online_ids`'
        weights: planned on first use (their state exists once the plain step gathered them) and
        again whenever anything they hold was replaced (:meth:`_online_fingerprint`)."""
        cached = self._online_cache
        fingerprint = self._online_fingerprint(cached.weights)
        if cached.batches is None or cached.fingerprint != fingerprint:
            cached = self._online_cache = cached._replace(
                fingerprint=fingerprint, batches=self._plan_online(cached.weights)
            )
        return cached.batches

    def _online_fingerprint(self, weights: list[Tensor]) -> tuple:
        """What a plan of ``weights`` captured, by identity: the config, the param group dicts and
        their ``master_weights``, each weight's state dict and every entry of it (the state
        tensors the plan holds among them), and each weight's address and strides. Any object
        replaced (``opt.state[w]["exp_avg"] = ...``, ``opt.param_groups[0] = {...}``,
        ``opt.hpa = ...``, ``w.data = ...``) changes it; a state tensor given another storage in
        place (``state["exp_avg"].data = ...``, ``set_``) does not, and is not followed (assign a
        new tensor instead)."""
        states = list(map(self.state.__getitem__, weights))  # every one has state by now (gathered)
        return (
            id(self.hpa),
            tuple(map(id, self.param_groups)),
            tuple(group.get("master_weights") for group in self.param_groups),
            tuple(map(id, states)),
            tuple(map(id, chain.from_iterable(map(dict.values, states)))),  # every entry, in order
            tuple(map(Tensor.data_ptr, weights)),
            tuple(map(Tensor.stride, weights)),
        )

    def _plan_online(self, weights: list[Tensor]) -> list[online.OnlineBatch]:
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        layers = []
        for weight in weights:
            state = self.state[weight]
            working = self._working_weight(weight, state)
            layers.append((weight, group_of[id(weight)], state, working, self._snapshot(weight, state, working)))
        return online.plan_online_batches(layers, config=self.hpa, backend=self.backend)

    def _online_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The online HPA step of every managed weight with a gradient, one prepared
        :class:`hpa_kernels.ops.OnlineStepsPlan` per (param group, device): AdamW, then the
        retained columns back to W_prev and ΔW made orthogonal to W_prev (exactly, or but for the
        lagged coefficient the next step removes); every ``refresh_every`` steps a new column
        mask from the accumulated update energies."""
        online.online_batches_step(self._online_batches(), grad_scale=grad_scale, found_inf=found_inf)
        if found_inf is not None and bool(found_inf.item()):
            return  # a skipped step does not count towards the refresh (one host sync, online mode only)
        self._online_steps += 1
        if self.hpa.refresh_every and self._online_steps % self.hpa.refresh_every == 0:
            self._refresh_masks()

    def _refresh_masks(self) -> None:
        """New retained columns for the online step of every managed weight (:func:`online.refresh_mask`)."""
        for layer in self.hpa_layers.values():
            weight = layer.module.weight
            working = self._working_weight(weight)
            online.refresh_mask(
                self.state[weight],
                self._snapshot(weight),
                working,
                layer.retain_ratio,
                orthogonal=self.hpa.orthogonal,
                backend=self.backend,
            )
            if "master_param" in self.state[weight]:
                weight.detach().copy_(working)

    # ------------------------------------------------------------------ the HPA task lifecycle

    @torch.no_grad()
    def begin_task(
        self, hinv_safety: Mapping[str, Tensor] | None = None, *, safety_hessians: Mapping[str, Tensor] | None = None
    ) -> None:
        """Start a task: snapshot W_prev of every managed layer and keep its safety statistics.

        Args:
            hinv_safety: ``{name: hinv_s}``, diag(H⁻¹) of the layer's inputs on the safety set
                (:func:`hpa_kernels.integrations.calibrate` or ``HessianCollector.hinv()``, on
                W_prev): (in_features,) positive finite vectors, one per managed layer. May be
                ``None`` only when ``hpa.enabled`` is False.
            safety_hessians: the former name of ``hinv_safety`` (a ``DeprecationWarning``; removed
                in the next release).

        Raises:
            RuntimeError: a task is already open.
            ValueError: a missing layer, a wrong length, NaN/Inf or non-positive entries, a
                non-finite weight, a sharded (DTensor) ``Conv1D``, or online mode on a LoRA,
                sharded or ``Conv1D`` (transposed) layer, naming the layer. Nothing is stored
                when it raises.
        """
        hinv_safety = _renamed("begin_task", "hinv_safety", hinv_safety, "safety_hessians", safety_hessians)
        if self._in_task:
            raise RuntimeError("HPAOptimizer.begin_task: a task is already open; call end_task first")
        if self.hpa.enabled and not self.hpa_layers:
            warnings.warn(
                "HPAOptimizer.begin_task: no layer is managed, so the task will not be edited (build the "
                "optimizer with HPAOptimizer.from_model(model) or pass hpa_layers=)",
                UserWarning,
                stacklevel=2,
            )
        if self.hpa.enabled:
            checked = check_statistics("hinv_safety", hinv_safety, self.hpa_layers)
            check_weights_finite(self.hpa_layers)
            check_task_support(self.hpa_layers, online=self.hpa.online)
            snapshot_layers(
                self.hpa_layers, self.state, checked, working_of=self._working_weight, online=self.hpa.online
            )
        self._online_steps = 0
        self._online_cache = None
        self._in_task = True

    @torch.no_grad()
    def end_task(
        self, hinv_task: Mapping[str, Tensor] | None = None, *, task_hessians: Mapping[str, Tensor] | None = None
    ) -> dict[str, LayerReport]:
        """End the task: apply HPA_SPEC.md Steps 1–3 to every managed layer, in place.

        Every input is checked and every layer's selection computed before the first write; each
        layer is then written whole (computed aside, copied in), so a failure leaves every layer
        either fully edited or untouched (:class:`HPAEditError` says which). The task then stays
        open: calling ``end_task`` again with the same statistics edits the untouched layers only
        (an edited layer is never edited twice) and returns the reports of all of them.

        PEFT LoRA layers are planned on W_new = W + Σ scale·BA computed out of place; the merge
        reaches the base weight only with Ŵ, and the adapters are reset when their layer is
        written. A NaN in an adapter therefore raises ValueError with every weight as it was.

        With master weights the edit acts on the fp32 copy and the parameter receives its rounding;
        a snapshot of another dtype (loaded from a checkpoint of another set-up) is cast to the
        working weight's dtype for the edit, so retained columns are W_prev in that dtype.

        Args:
            hinv_task: ``{name: hinv_t}``, diag(H⁻¹) of the layer's inputs on the task set (on
                W_new), as ``hinv_safety``. May be ``None`` only when ``hpa.enabled`` is False.
            task_hessians: the former name of ``hinv_task`` (a ``DeprecationWarning``; removed in
                the next release).

        Returns:
            ``{name: LayerReport}``; empty when HPA is disabled.

        Raises:
            RuntimeError: no task is open.
            ValueError: missing, mis-shaped, non-finite or non-positive statistics, a non-finite
                weight or snapshot, a snapshot whose shape does not fit its weight, or an update
                whose projection overflows (the layer is named); no weight changes.
            RuntimeError: a lost snapshot or statistics (the layer is named); no weight changes.
            HPAEditError: a failure while writing.
        """
        hinv_task = _renamed("end_task", "hinv_task", hinv_task, "task_hessians", task_hessians)
        if not self._in_task:
            raise RuntimeError("HPAOptimizer.end_task: no task is open; call begin_task first")
        self._online_cache = None  # the edit rewrites the state the plan holds, and closes the task
        if not self.hpa.enabled:
            self._in_task = False
            self._tasks_completed += 1
            return {}
        checked = check_statistics("hinv_task", hinv_task, self.hpa_layers)
        # Non-finite weights are caught by each layer's plan below (on the reduce's outputs).
        for name, layer in self.hpa_layers.items():
            state = self.state[layer.module.weight]
            if "hpa_prev" not in state or "hpa_hinv_safety" not in state:
                raise RuntimeError(
                    f"HPAOptimizer.end_task: no W_prev snapshot or safety statistics for {name!r} (state lost?)"
                )
        todo = {name: layer for name, layer in self.hpa_layers.items() if name not in self._edited}
        new_weights = {name: self._task_weight(layer) for name, layer in todo.items()}
        plans = plan_edits(
            todo,
            prev_of=self._snapshot,
            new_weights=new_weights,
            hinv_safety={name: self.state[layer.module.weight]["hpa_hinv_safety"] for name, layer in todo.items()},
            hinv_task=checked,
            config=self.hpa,
            backend=self.backend,
        )
        write_edits(
            plans,
            self.hpa_layers,
            prev_of=self._snapshot,
            new_weights=new_weights,
            working_of=self._working_weight,
            optimizer_state=self.state,
            edited=self._edited,
            backend=self.backend,
        )
        for layer in self.hpa_layers.values():
            state = self.state[layer.module.weight]
            for key in optim_state.TASK_STATE:
                state.pop(key, None)
        reports = {name: self._edited[name] for name in self.hpa_layers}
        self._edited = {}
        self._in_task = False
        self._tasks_completed += 1
        return reports

    def _working_weight(self, weight: Tensor, state: Mapping[str, Any] | None = None) -> Tensor:
        """The tensor steps update for ``weight``: its fp32 master copy, or the weight itself
        (detached); ``state``: the weight's optimizer state, when the caller holds it."""
        if state is None:
            state = self.state[weight] if weight in self.state else {}
        master = state.get("master_param")
        return weight.detach() if master is None else master

    def _task_weight(self, layer: ManagedLayer) -> Tensor:
        """W_new of a managed layer: the working weight, or for a PEFT LoRA layer the merged weight
        W + Σ scale·BA computed out of place (nothing in the model changes before the write)."""
        weight = layer.module.weight
        if layer.adapter is not None:
            return adapters.merged_weight(layer.adapter, weight)
        return self._working_weight(weight)

    def _snapshot(
        self, weight: Tensor, state: Mapping[str, Any] | None = None, working: Tensor | None = None
    ) -> Tensor:
        """W_prev of ``weight`` in the working weight's dtype (a snapshot loaded from another set-up
        keeps its dtype in the state; the edit casts it); ``state`` / ``working``: the weight's
        optimizer state and working weight, when the caller holds them."""
        if state is None:
            state = self.state[weight]
        prev = state["hpa_prev"]
        dtype = (self._working_weight(weight, state) if working is None else working).dtype
        return prev if prev.dtype == dtype else prev.to(dtype)
