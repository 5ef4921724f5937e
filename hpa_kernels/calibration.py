"""Calibration statistics: per-layer input Hessians H = (2/n)·XᵀX and diag(H⁻¹) (HPA_SPEC.md Step 0)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .distributed import all_reduce_calibration, resolve_group
from .functional import hinv_diagonal


class _Group:
    """XᵀX of one distinct input, shared by the layers that read it (q/k/v, gate/up)."""

    __slots__ = ("xtx", "tokens", "last_input", "pending_xtx", "pending_tokens")

    def __init__(self) -> None:
        self.xtx: Tensor | None = None
        self.tokens = 0
        self.last_input: Tensor | None = None
        # The forward pass in progress: committed to xtx / tokens only when the pass completes.
        self.pending_xtx: Tensor | None = None
        self.pending_tokens = 0

    def discard(self) -> None:
        self.pending_xtx, self.pending_tokens = None, 0

    def commit(self) -> None:
        if self.pending_xtx is not None:
            self.xtx = self.pending_xtx if self.xtx is None else self.xtx + self.pending_xtx
            self.tokens += self.pending_tokens
        self.discard()


class HessianCollector:
    """Forward hooks that accumulate each managed layer's input Hessian, label-free.

    For a layer ``nn.Linear(c, r)`` whose inputs, over the calibration set and without padding
    positions, stack to X of shape (n_tokens, c)::

        H = (2 / n_tokens) · Xᵀ X          (c × c, accumulated in fp32 whatever the model dtype)

    Layers that read the same input tensor in a forward pass (q/k/v, gate/up) share one
    accumulation. A forward pass of ``model`` counts whole or not at all: the statistics of a pass
    that raises (a wrong attention mask, out of memory, an interrupt) are dropped, so every layer
    keeps the same token count (layers called outside a forward of ``model`` count at once). Use
    as a context manager: hooks are registered on entry and removed on exit; the statistics stay
    readable after exit::

        with HessianCollector(model, opt.hpa_layers) as hc:
            for batch in loader:
                hc.set_attention_mask(batch["attention_mask"])
                model(**batch)
        hinv = hc.hinv()            # {name: Tensor[in_features]}

    Args:
        model: the model the layers belong to (names are taken from ``model.named_modules()``).
        layers: the layers to watch: a mapping ``{name: nn.Linear}`` (or ``{name: ManagedLayer}``,
            as ``HPAOptimizer.hpa_layers``) or an iterable of module names.
        all_reduce: sum XᵀX and the token counts over the data-parallel ranks (DDP, FSDP2) before
            forming H: ``None`` (default) when ``torch.distributed`` is initialised with more than
            one rank, ``True`` always, ``False`` never. When it applies, the first call of
            :meth:`hessian`, :meth:`hinv` or :meth:`num_tokens` is collective (every rank calls it,
            each after its own share of the calibration batches; a rank may have none), and the
            collector accepts no further forwards. See :mod:`hpa_kernels.distributed`.
        process_group: the data-parallel group (default: the whole world).

    Raises:
        ValueError: a name that is not an ``nn.Linear`` of ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, object] | Iterable[str],
        *,
        all_reduce: bool | None = None,
        process_group: object | None = None,
    ) -> None:
        modules = dict(model.named_modules())
        names = list(layers.keys()) if isinstance(layers, Mapping) else list(layers)
        self._layers: dict[str, nn.Linear] = {}
        for name in names:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"HessianCollector: {name!r} is not an nn.Linear of the model")
            self._layers[name] = module
        self._group_of: dict[str, _Group] = {}
        self._last: tuple[Tensor, _Group] | None = None
        self._mask: Tensor | None = None
        self._model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._in_pass = False
        self._all_reduce = all_reduce
        self._process_group = process_group
        self._reduced = False

    def __enter__(self) -> HessianCollector:
        if self._handles:
            raise RuntimeError("HessianCollector is already active")
        # Each forward of the whole model starts afresh: an input tensor is only "shared" within one pass.
        self._handles.append(self._model.register_forward_pre_hook(self._new_pass))
        self._handles.append(self._model.register_forward_hook(self._end_pass))
        for name, module in self._layers.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None
        self._mask = None
        self._end_pass(commit=False)  # a pass still open here raised: it does not count

    def _new_pass(self, module: nn.Module, args: tuple) -> None:
        self._end_pass(commit=False)  # a pass still open here raised: it does not count
        self._in_pass = True

    def _end_pass(self, *hook_args: object, commit: bool = True) -> None:
        for group in set(self._group_of.values()):
            if commit:
                group.commit()
            else:
                group.discard()
            group.last_input = None
        self._last = None
        self._in_pass = False

    def set_attention_mask(self, attention_mask: Tensor | None) -> None:
        """Mask for the following forward passes: positions where it is 0 are padding.

        Args:
            attention_mask: (B, T) of 0/1 (any integer, bool or float dtype), or ``None`` to
                count every position. Layer inputs of shape (B, T, c) keep the rows where the
                mask is non-zero; inputs of shape (B·T, c) are matched against the flattened mask.
        """
        self._mask = None if attention_mask is None else attention_mask.detach() != 0

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            self._accumulate(name, args[0])

        return hook

    def _rows(self, name: str, x: Tensor) -> Tensor:
        c = x.shape[-1]
        if self._mask is None:
            return x.reshape(-1, c)
        mask = self._mask.to(x.device)
        if tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask]
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return x[mask.reshape(-1)]
        raise ValueError(
            f"HessianCollector: attention mask of shape {tuple(mask.shape)} does not match the input of "
            f"{name!r}, shape {tuple(x.shape)} (expected leading dims equal to the mask's)"
        )

    def _accumulate(self, name: str, x: Tensor) -> None:
        if self._reduced:
            raise RuntimeError("HessianCollector: statistics were all-reduced across ranks; use a new collector")
        group = self._group_of.get(name)
        if group is None:
            # First sight: join the group of the layer that just read this very tensor, if any.
            shared = self._last is not None and self._last[0] is x
            group = self._last[1] if shared else _Group()
            self._group_of[name] = group
        if group.last_input is x:
            return  # another layer of the group already counted this input
        rows = self._rows(name, x.detach()).float()
        xtx = rows.T @ rows
        group.pending_xtx = xtx if group.pending_xtx is None else group.pending_xtx + xtx
        group.pending_tokens += rows.shape[0]
        group.last_input = x
        self._last = (x, group)
        if not self._in_pass:  # a layer called outside a forward of the model counts at once
            group.commit()

    def _sync(self) -> None:
        """Sum the statistics over the data-parallel ranks, once (see ``all_reduce`` in the class doc)."""
        if self._reduced:
            return
        group = resolve_group(self._all_reduce, self._process_group)
        if group is None:
            return
        names = list(self._layers)
        leader_of: dict[int, int] = {}
        leaders = []
        for index, name in enumerate(names):
            local = self._group_of.get(name)
            leaders.append(-1 if local is None else leader_of.setdefault(id(local), index))
        owned = {lead: self._group_of[names[lead]] for lead in set(leaders) if lead >= 0}
        agreed, xtx, tokens = all_reduce_calibration(
            leaders,
            {lead: g.xtx for lead, g in owned.items() if g.xtx is not None},
            {lead: g.tokens for lead, g in owned.items()},
            [module.in_features for module in self._layers.values()],
            group,
        )
        merged: dict[int, _Group] = {}
        for name, lead in zip(names, agreed):
            if lead < 0:
                continue
            if lead not in merged:
                merged[lead] = _Group()
                merged[lead].xtx, merged[lead].tokens = xtx[lead], tokens[lead]
            self._group_of[name] = merged[lead]
        self._reduced = True

    def num_tokens(self, name: str) -> int:
        """Tokens counted for layer ``name`` (0 if it saw none), over all ranks when all-reducing."""
        self._sync()
        group = self._group_of.get(name)
        return 0 if group is None else group.tokens

    def hessian(self, name: str) -> Tensor:
        """H = (2/n)·XᵀX of layer ``name``: (c, c) float32.

        Raises:
            KeyError: unknown layer name.
            ValueError: the layer saw no (unmasked) token.
        """
        if name not in self._layers:
            raise KeyError(f"HessianCollector does not watch {name!r}")
        self._sync()
        group = self._group_of.get(name)
        if group is None or group.tokens == 0 or group.xtx is None:
            raise ValueError(f"HessianCollector: layer {name!r} saw no tokens; run calibration forwards first")
        return group.xtx * (2.0 / group.tokens)

    def hinv(self, damping: float = 0.01) -> dict[str, Tensor]:
        """diag((H + λI)⁻¹) for every watched layer (HPA_SPEC.md Step 0).

        Args:
            damping: λ / mean(diag H); see :func:`hpa_kernels.functional.hinv_diagonal`.

        Returns:
            ``{name: Tensor[in_features]}`` float32, in the order the layers were given; layers
            sharing an input share the computation.

        Raises:
            ValueError: a layer that saw no tokens, an H without signal (all-zero inputs), with
                NaN / Inf (overflowing activations) or too small for float32 — the layer is named.
                A rank-deficient H (few tokens, many columns; dead input features) is no error: the
                damping λ = damping·mean(diag H) makes it positive definite, and a column that
                never saw a non-zero input gets exactly 1/λ (:func:`hinv_diagonal`). Never NaN.
        """
        done: dict[int, Tensor] = {}
        result: dict[str, Tensor] = {}
        for name in self._layers:
            hessian = self.hessian(name)
            key = id(self._group_of[name])
            if key not in done:
                try:
                    done[key] = hinv_diagonal(hessian, damping)
                except ValueError as error:
                    raise ValueError(f"HessianCollector: layer {name!r}: {error}") from error
            result[name] = done[key]
        return result
