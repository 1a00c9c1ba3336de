"""Attention in the open: a reference computation of ``softmax(Q K^T * scale + mask) V``
whose softmax is the caller's, and a ``TorchFunctionMode`` that routes a model's attention
through it, whatever the model calls:

* ``F.scaled_dot_product_attention`` (however imported: the mode sees the call itself);
* ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers built on it, through
  ``F.multi_head_attention_forward``: its body runs with the ``scaled_dot_product_attention``
  and ``softmax`` it calls (``need_weights`` False / True) replaced by the reference and by
  the caller's softmax, for that call only (module attributes swapped and restored: one
  thread at a time may run a simulated ``MultiheadAttention``).

The simulator's softmax (:class:`SimulatedSoftmax`) rounds, in the forward pass, the
softmax input ``S - rowmax(S)`` (finite entries only: a masked ``-inf`` stays ``-inf``, so
masks keep masking) and the probabilities ``P``; in the backward pass the error ``dP``
arriving at ``P`` and the error ``dS = P * (dP - rowsum(dP * P))`` leaving the softmax,
computed from the stored (rounded) ``P`` and the rounded ``dP``, as an attention backward
pass computes it. The row maximum is a shift, not a value that learns: no gradient goes
through it (as in FlashAttention-style kernels). A row with every key masked gets zero
probabilities (torch's own math attention does the same).

Masks: a boolean mask (True: attend) and ``is_causal`` (top-left aligned, as torch's) are
selections, exact; a float mask is added to the scores, and its ``-inf`` entries mask. A
finite float mask entry is a score like any other and is rounded (a bias such as ALiBi's;
a ``-1e9`` "mask" saturates with the rest of the softmax input and is counted).

This module knows nothing of formats: the rounding is the point's (:mod:`lpcli.simulate`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .models import layer_name

# The tensors of an attention softmax a plan gives formats to, in the order of a step:
#   input        S - rowmax(S), the softmax input (finite entries)
#   probs        P, the probabilities multiplied with V
#   probs_error  dP, the error arriving at P in the backward pass
#   input_error  dS, the error leaving the softmax towards Q and K
ROLES = ("input", "probs", "input_error", "probs_error")
# How rounded rows of P enter P·V: "each" (as rounded; a row may no longer sum to one) or
# "renormalized" (divided by the row's sum of rounded probabilities, as a kernel that
# normalizes after P·V with the sum of what it multiplied).
ROWS = ("each", "renormalized")

Softmax = Callable[[torch.Tensor, bool], torch.Tensor]  # (scores, may hold -inf) -> probabilities
_SDPA = F.scaled_dot_product_attention


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: float | None = None, enable_gqa: bool = False, *, softmax: Softmax) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s semantics with ``softmax`` over the keys."""
    length, keys = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and query.size(-3) != key.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scores = (query * scale) @ key.transpose(-2, -1)
    masked = None
    if is_causal:
        masked = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril().logical_not()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            masked = attn_mask.logical_not() if masked is None else masked | attn_mask.logical_not()
        else:
            scores = scores + attn_mask
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    p = softmax(scores, attn_mask is not None or is_causal)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    return p @ value


class Point(Protocol):
    """What :class:`SimulatedSoftmax` needs of the simulator: a rounding per role that counts
    (``masked``: where the elements are masked entries, not values, to leave out of the
    counts), the key count seen, and how rounded rows enter P·V."""

    renormalize: bool

    def round(self, role: str, x: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor: ...

    def saw(self, keys: int) -> None: ...


class SimulatedSoftmax(torch.autograd.Function):
    """Forward: round ``S - rowmax(S)`` and ``P``. Backward: round ``dP`` and ``dS``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, point: Point, maybe_masked: bool) -> torch.Tensor:
        point.saw(scores.size(-1))
        rowmax = scores.amax(dim=-1, keepdim=True)
        masked = None
        if maybe_masked:
            rowmax = rowmax.nan_to_num(neginf=0.0)  # a fully masked row: keep it -inf, not nan
            shifted = scores - rowmax
            masked = torch.isneginf(shifted)
            q = point.round("input", shifted.masked_fill(masked, 0.0), masked).masked_fill(masked, float("-inf"))
            p = torch.softmax(q, dim=-1).nan_to_num(nan=0.0)
        else:
            q = point.round("input", scores - rowmax)
            p = torch.softmax(q, dim=-1)
        p = point.round("probs", p, masked)
        if point.renormalize:
            total = p.sum(dim=-1, keepdim=True)
            p = torch.where(total > 0, p / total, p)
        ctx.save_for_backward(p)
        ctx.point = point
        return p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (p,) = ctx.saved_tensors
        point: Point = ctx.point
        dp = point.round("probs_error", grad)
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
        return point.round("input_error", ds), None, None


def simulated_softmax(point: Point) -> Softmax:
    return lambda scores, maybe_masked: SimulatedSoftmax.apply(scores, point, maybe_masked)


class AttentionMode(TorchFunctionMode):
    """While active, attention (see the module docstring) goes through
    :func:`reference_attention` with the softmax ``softmax_for()`` returns (None: the
    call runs as it is)."""

    def __init__(self, softmax_for: Callable[[], Softmax | None]) -> None:
        super().__init__()
        self.softmax_for = softmax_for

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            softmax = self.softmax_for()
            if softmax is not None:
                return reference_attention(*args, softmax=softmax, **kwargs)
        elif func is F.multi_head_attention_forward:
            softmax = self.softmax_for()
            if softmax is not None:
                with _inside_multi_head_attention(softmax):
                    return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _inside_multi_head_attention(softmax: Softmax) -> Iterator[None]:
    """``F.multi_head_attention_forward`` calls ``scaled_dot_product_attention`` (without
    weights) or ``softmax`` over the keys (with weights) by their names in
    ``torch.nn.functional``: both stand in for the simulated ones during the call."""

    def sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        return reference_attention(*args, softmax=softmax, **kwargs)

    def keys_softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
        if dim not in (-1, input.dim() - 1) or dtype is not None:
            raise RuntimeError("multi_head_attention_forward called softmax over another dimension than the keys")
        return softmax(input, True)

    saved = F.scaled_dot_product_attention, F.softmax
    F.scaled_dot_product_attention, F.softmax = sdpa, keys_softmax
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.softmax = saved


class ModuleStack:
    """The qualified names of the modules of ``model`` whose forward is running, innermost
    last: whose attention a call is."""

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(layer_name(name))))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.names.append(name)
        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.names:
            self.names.pop()

    @property
    def innermost(self) -> str | None:
        return self.names[-1] if self.names else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def mode_around(module: nn.Module, mode_for: Callable[[], TorchFunctionMode]) -> list[Any]:
    """Hooks that keep a fresh mode from ``mode_for()`` active while ``module``'s forward
    runs (also when it raises): the handles, to remove."""
    active: list[TorchFunctionMode] = []

    def enter(module: nn.Module, args: tuple) -> None:
        mode = mode_for()
        mode.__enter__()
        active.append(mode)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
