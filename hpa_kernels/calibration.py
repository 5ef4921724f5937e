"""Calibration statistics: per-layer input Hessians H = (2/n)·XᵀX and diag(H⁻¹) (HPA_SPEC.md Step 0)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import all_reduce_calibration, broadcast_vectors_from_first, local_tensor, resolve_group
from .functional import hinv_diagonal
from .layers import LANGUAGE_PARTS, _within, find_block_stacks, in_features, is_linear, stack_parts

_ABSENT = object()  # a forward call without an ``attention_mask`` keyword


class _Group:
    """XᵀX of one distinct input, shared by the layers that read it (q/k/v, gate/up)."""

    __slots__ = ("xtx", "tokens", "last_input", "pending_xtx", "pending_tokens")

    def __init__(self) -> None:
        self.xtx: Tensor | None = None
        self.tokens = 0
        self.last_input: Tensor | None = None
        # The forward pass in progress: xtx plus its products (computed by the GEMM, xtx as its
        # addend: no separate pass), and its tokens; becomes xtx / is added to tokens only when the
        # pass completes, and is dropped otherwise.
        self.pending_xtx: Tensor | None = None
        self.pending_tokens = 0

    def discard(self) -> None:
        self.pending_xtx, self.pending_tokens = None, 0

    def commit(self) -> None:
        if self.pending_xtx is not None:
            self.xtx = self.pending_xtx  # already xtx + this pass's products
            self.tokens += self.pending_tokens
        self.discard()


def _call_mask(kwargs: Mapping[str, Any]) -> Tensor | None | object:
    """The (B, t) bool mask of the positions a forward call computes, from its keywords: ``None``
    for ``attention_mask=None`` (every position counts), ``_ABSENT`` without a 2-D mask."""
    mask = kwargs.get("attention_mask", _ABSENT)
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return _ABSENT  # a 4-D mask inside a model is built from a 2-D one further out
    mask = mask.detach() != 0
    sequence = next(
        (kwargs[key] for key in ("input_ids", "inputs_embeds") if isinstance(kwargs.get(key), Tensor)), None
    )
    if sequence is not None and sequence.dim() >= 2 and sequence.shape[1] < mask.shape[1]:
        mask = mask[:, -sequence.shape[1] :]  # decoding with a KV cache: the mask covers the cached positions too
    return mask


class _Call:
    """The masks of one forward call of a module above a block stack (from its keyword arguments)."""

    __slots__ = ("mask", "encoder_states", "encoder_mask")

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        self.mask = _call_mask(kwargs)
        self.encoder_states = kwargs.get("encoder_hidden_states")
        encoder_mask = kwargs.get("encoder_attention_mask")
        self.encoder_mask = (
            encoder_mask.detach() != 0 if isinstance(encoder_mask, Tensor) and encoder_mask.dim() == 2 else None
        )


class HessianCollector:
    """Forward hooks that accumulate each managed layer's input Hessian, label-free.

    For a linear layer with c input features (``nn.Linear(c, r)``, ``Conv1D(r, c)``) whose inputs,
    over the calibration set and without padding positions, stack to X of shape (n_tokens, c)::

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

    **Which positions count** (HPA_SPEC.md Step 0: padding is excluded). The masks are read from
    the model's own forward calls, so multimodal, encoder-decoder and ``generate`` calls need no
    help: each block stack takes the ``attention_mask`` keyword of the innermost module above it
    whose call has a 2-D one (or ``None``), among the modules above that stack and no other (a
    LLaVA's language model, each ``T5Stack``, a Llama's ``LlamaModel``), so the text decoder of a multimodal model gets the mask of its own input sequence,
    image tokens included (they count as tokens), and each stack of an encoder-decoder its own
    mask; a decoder layer reading the encoder's output (cross-attention keys and values) takes that
    call's ``encoder_attention_mask``. When a call's sequence (``input_ids`` / ``inputs_embeds``) is
    shorter than its mask (``generate`` with a KV cache), the mask's last positions are used. A call
    with ``attention_mask=None`` counts every position. The layers of a tower (the vision tower of a
    multimodal model, :func:`hpa_kernels.layers.stack_parts`) count every patch, never masked.
    Layers outside every block stack take the model call's mask when their input is laid out as
    (B, T, c) with the mask's (B, T), else count every row (a projector reading image features).
    [decision] Inside a stack, a 2-D input whose rows are not the B·T positions (tokens routed to
    one expert) counts every row: routing loses the positions. Only where no forward call gave a
    mask does :meth:`set_attention_mask` apply, strictly.

    Args:
        model: the model the layers belong to (names are taken from ``model.named_modules()``).
        layers: the layers to watch: a mapping ``{name: nn.Linear}`` (or ``{name: ManagedLayer}``,
            as ``HPAOptimizer.hpa_layers``) or an iterable of module names; ``Conv1D`` layers too.
        all_reduce: sum XᵀX and the token counts over the data-parallel ranks (DDP, FSDP2) before
            forming H: ``None`` (default) when ``torch.distributed`` is initialised with more than
            one rank, ``True`` always, ``False`` never. When it applies, the first call of
            :meth:`hessian`, :meth:`hinv` or :meth:`num_tokens` is collective (every rank calls it,
            each after its own share of the calibration batches; a rank may have none), and the
            collector accepts no further forwards. Every call of :meth:`hinv` is then collective
            too: it returns the group's first rank's vectors, bit-identical on every rank, so that
            every rank selects the same columns. See :mod:`hpa_kernels.distributed`.
        process_group: the data-parallel group (default: the whole world).

    Raises:
        ValueError: a name that is not an ``nn.Linear`` (or ``Conv1D``) of ``model``.
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
        self._layers: dict[str, nn.Module] = {}
        for name in names:
            module = modules.get(name)
            if module is None or not is_linear(module):
                raise ValueError(f"HessianCollector: {name!r} is not an nn.Linear (or Conv1D) of the model")
            self._layers[name] = module
        self._scope: dict[str, tuple[int, ...] | None] = {}  # None: a tower layer, never masked
        self._chain_modules: dict[int, nn.Module] = {}
        stacks = [stack for stack, _ in find_block_stacks(model)]
        parts = stack_parts(model, stacks)
        for name in names:
            stack = next((s for s in stacks if _within(name, s)), None)
            if stack is not None and parts[stack] not in LANGUAGE_PARTS:
                self._scope[name] = None
                continue
            chain: list[int] = []
            if stack is not None:  # the modules above the stack and above no other stack, outermost first
                components = stack.split(".") if stack else []
                for depth in range(len(components)):
                    above = ".".join(components[:depth])
                    if all(other == stack or not _within(other, above) for other in stacks):
                        chain.append(id(modules[above]))
                        self._chain_modules[id(modules[above])] = modules[above]
            self._scope[name] = tuple(chain)
        self._calls: dict[int, _Call] = {}  # the calls in progress of the chain modules and the model
        self._group_of: dict[str, _Group] = {}
        self._last: tuple[Tensor, _Group] | None = None
        self._mask: Tensor | None = None
        self._model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._in_pass = False
        self._all_reduce = all_reduce
        self._process_group = process_group
        self._reduced = False
        self._reduce_group: Any | None = None  # the group all-reduced over, once synced

    def __enter__(self) -> HessianCollector:
        if self._handles:
            raise RuntimeError("HessianCollector is already active")
        # Each forward of the whole model starts afresh: an input tensor is only "shared" within one pass.
        self._handles.append(self._model.register_forward_pre_hook(self._new_pass, with_kwargs=True))
        self._handles.append(self._model.register_forward_hook(self._end_pass))
        for module in self._chain_modules.values():
            if module is self._model:
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
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

    def _new_pass(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._end_pass(commit=False)  # a pass still open here raised: it does not count
        self._in_pass = True
        self._calls[id(module)] = _Call(kwargs)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._calls[id(module)] = _Call(kwargs)

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self._calls.pop(id(module), None)

    def _end_pass(self, *hook_args: object, commit: bool = True) -> None:
        for group in set(self._group_of.values()):
            if commit:
                group.commit()
            else:
                group.discard()
            group.last_input = None
        self._last = None
        self._in_pass = False
        self._calls.clear()

    def set_attention_mask(self, attention_mask: Tensor | None) -> None:
        """Mask for the following forward passes where the forward call gives none (a model whose
        forward takes no ``attention_mask`` keyword; see *Which positions count*): positions where
        it is 0 are padding. Tower layers are never masked.

        Args:
            attention_mask: (B, T) of 0/1 (any integer, bool or float dtype), or ``None`` to
                count every position. Layer inputs of shape (B, T, c) keep the rows where the
                mask is non-zero; inputs of shape (B·T, c) are matched against the flattened mask;
                any other shape raises ``ValueError`` in the forward.
        """
        self._mask = None if attention_mask is None else attention_mask.detach() != 0

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            self._accumulate(name, args[0])

        return hook

    def _rows(self, name: str, x: Tensor) -> Tensor:
        """The rows of ``x`` (..., c) that count, as (n, c) (see *Which positions count*)."""
        scope = self._scope.get(name, ())
        if scope is None:
            return self._select(name, x, None, routed=False)
        for key in reversed(scope):  # the innermost call: the sequence the stack itself reads
            call = self._calls.get(key)
            if call is None:
                continue
            if call.encoder_states is x:
                return self._select(name, x, call.encoder_mask, routed=True)
            if call.mask is not _ABSENT:
                return self._select(name, x, call.mask, routed=True)
        if not scope:
            call = self._calls.get(id(self._model))
            if call is not None and call.mask is not _ABSENT:
                fits = call.mask is not None and tuple(x.shape[:-1]) == tuple(call.mask.shape)
                return self._select(name, x, call.mask if fits else None, routed=False)
        return self._select(name, x, self._mask, routed=False)

    def _select(self, name: str, x: Tensor, mask: Tensor | None, *, routed: bool) -> Tensor:
        """``x`` (..., c) reduced to its rows where ``mask`` (B, T) is set, as (n, c); with
        ``routed``, a 2-D ``x`` that is not (B·T, c) keeps every row."""
        x, c = x.detach(), x.shape[-1]
        if mask is None:
            return x.reshape(-1, c)
        mask = mask.to(x.device)
        if tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask]
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return x[mask.reshape(-1)]
        if routed and x.dim() == 2:
            return x
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
        rows = self._rows(name, x).float()  # x itself: cross-attention inputs are told by identity
        if group.pending_xtx is None:
            group.pending_xtx = rows.T @ rows if group.xtx is None else torch.addmm(group.xtx, rows.T, rows)
        else:
            group.pending_xtx.addmm_(rows.T, rows)  # in place: no c x c temporary
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
            [in_features(module) for module in self._layers.values()],
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
        self._reduce_group = group
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
            raise ValueError(
                f"HessianCollector: layer {name!r} saw no tokens; run calibration forwards first (a layer the "
                "model never calls, using only its weight, as Jamba's mamba.dt_proj, cannot be calibrated: "
                "leave it out with HPAConfig.exclude)"
            )
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
        self._sync()
        group = self._reduce_group
        # One slot per distinct input (layers sharing it share the vector), in layer order. With a
        # group, a slot that fails here is kept for after the broadcast: every rank must take part.
        slots: dict[object, str] = {}
        done: dict[object, Tensor] = {}
        failed: dict[object, tuple[ValueError, ValueError | None]] = {}
        for name in self._layers:
            owner = self._group_of.get(name)
            key = name if owner is None else id(owner)
            if key in slots:
                continue
            slots[key] = name
            try:
                hessian = self.hessian(name)
            except ValueError as error:
                failed[key] = (error, None)
            else:
                try:
                    done[key] = hinv_diagonal(hessian, damping)
                except ValueError as error:
                    failed[key] = (ValueError(f"HessianCollector: layer {name!r}: {error}"), error)
            if key in failed and group is None:
                raise failed[key][0] from failed[key][1]
        if group is not None:
            # diag(H⁻¹) decides the selection: the group's first rank's vectors on every rank, so
            # that neither the all-reduce's bits nor this rank's factorisation can change a column.
            # [decision] Broadcast here (c floats per input) rather than XᵀX after the all-reduce
            # (c² floats, and the Cholesky factorisation would still run on every rank).
            keys = list(slots)
            devices = {key: done[key].device if key in done else self._device_of(slots[key]) for key in keys}
            agreed = broadcast_vectors_from_first(
                [done.get(key) for key in keys],
                [in_features(self._layers[slots[key]]) for key in keys],
                group,
                devices[keys[0]] if keys else torch.device("cpu"),
            )
            for key, vector in zip(keys, agreed):
                if vector is None:
                    error, cause = failed.get(key) or (
                        ValueError(
                            f"HessianCollector: layer {slots[key]!r}: diag(H⁻¹) failed on the first rank of the "
                            "process group"
                        ),
                        None,
                    )
                    raise error from cause
                done[key] = vector.to(devices[key])
        result: dict[str, Tensor] = {}
        for name in self._layers:
            owner = self._group_of.get(name)
            result[name] = done[name if owner is None else id(owner)]
        return result

    def _device_of(self, name: str) -> torch.device:
        """Where layer ``name``'s statistics live: its weight's (local) device."""
        return local_tensor(self._layers[name].weight).device
