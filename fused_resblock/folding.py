"""Eval-mode BN folding, cached.

conv(x, w) + b followed by BN with running statistics equals
conv(x, w * s) + (b - mean) * s + beta, with s = gamma / sqrt(var + eps).
The fold is cached per (conv, norm) pair and recomputed only when a parameter
or buffer changed: an entry holds weak references to its modules and to its
tensors' storages, and each tensor's id, storage pointer and version counter, so
an in-place update, ``load_state_dict``, ``.to()`` or a replaced tensor
invalidates it and nothing else does. While a storage lives no other has its
address, so an id or address reused after a free cannot pass for the old one
(``p.data = new`` keeps the Parameter but frees its storage). No weak reference to
the tensors themselves: ``torch.utils.swap_tensors`` (``.to()`` and
``load_state_dict`` under ``torch.__future__.set_swap_module_params_on_conversion``,
tensor-subclass parameters) refuses tensors that have one. When autograd needs gradients
through the fold (fine-tuning with frozen BN) it is recomputed, differentiably.

A refold writes into the cached tensors when their shapes still fit, so a CUDA
graph captured earlier keeps valid pointers, and after ``refold(model)`` (or any
eager forward) reads the new weights. Inference-mode parameters (a model made
inside ``torch.inference_mode``) carry no version counter: their folds are not
cached. The cache is never pickled or deep-copied with its module.

Writes through ``.data`` (``p.data.mul_(d)``, as older EMA and optimizer code
does), through a NumPy view, or by torch's fused optimizers (``fused=True``:
their kernels leave the version counters alone) bump no version counter: every
optimizer step marks stale the folds that read its parameters (a global
``torch.optim`` step hook), the fused modules mark their folds stale on every
``train()``/``eval()`` call, and ``refold(model, force=True)`` redoes them all.

A hit costs a few microseconds (it is on every eval conv's path): the tensors
are read from the modules' own dictionaries, not through
``nn.Module.__getattr__`` (~1 us each).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import norms
from .backends.reference import stat_dtype


_ABSENT = object()
# an entry's key once marked stale (a mode switch, an optimizer step) is (_STALE, its key): the next
# lookup refolds, in place
_STALE = object()
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def member(module: nn.Module, name: str):
    """``getattr(module, name, None)`` without nn.Module.__getattr__ for parameters and buffers."""
    tensor = module._parameters.get(name, _ABSENT)
    if tensor is _ABSENT:
        tensor = module._buffers.get(name, _ABSENT)
        if tensor is _ABSENT:
            tensor = getattr(module, name, None)  # a parametrization's property, a plain attribute
    return tensor


def _tensors(pairs) -> list:
    """Every tensor the folds of (conv, norm, conv, norm, ...) read, in order (None where absent)."""
    tensors = []
    for i in range(0, len(pairs), 2):
        tensors.append(member(pairs[i], "weight"))
        tensors.append(member(pairs[i], "bias"))
        tensors.extend(member(pairs[i + 1], name) for name in NORM_TENSORS)
    return tensors


def _key(tensors, dtype: torch.dtype, pairs):
    """What the fold depends on besides its modules' identity and its storages' lives; None when it
    cannot be known (an inference tensor has no version). Each tensor's id, storage pointer and
    version counter: ``.to()``/``load_state_dict``/an in-place update change one of them (a dtype or
    device change makes a new storage)."""
    parts = [dtype]
    parts.extend(norm.eps for norm in pairs[1::2])
    try:
        for t in tensors:
            if t is None:
                parts.append(None)
            else:
                parts += (id(t), t.data_ptr(), t._version)
    except RuntimeError:  # an inference tensor's _version raises
        if any(t is not None and t.is_inference() for t in tensors):
            return None
        raise
    return tuple(parts)


def _anchors(objects) -> tuple:
    return tuple(None if o is None else weakref.ref(o) for o in objects)


def _storage_anchors(tensors) -> tuple:
    # a storage's Python object lives as long as the storage (PyTorch preserves it), so a weak
    # reference dies with the storage: ``p.data = new`` twice may reuse the first storage's address
    return tuple(None if t is None else weakref.ref(t.untyped_storage()) for t in tensors)


def _storages_alive(anchors: tuple) -> bool:
    """While an entry's storages live, no other storage has their addresses: the key's pointers are theirs."""
    for anchor in anchors:
        if anchor is not None and anchor() is None:
            return False
    return True


def _shared_cpu(tensors) -> bool:
    """Tensors in shared memory (``model.share_memory()``, Hogwild training): another process writes
    them and no version counter here sees it, so their folds are never cached."""
    return any(t is not None and t.device.type == "cpu" and t.is_shared() for t in tensors)


def _anchored(anchors: tuple, objects) -> bool:
    """True when ``anchors`` still refer to these very objects (None where an object is absent)."""
    for anchor, o in zip(anchors, objects):
        if (o is not None) if anchor is None else (anchor() is not o):
            return False
    return True


def fold_uncached(conv: nn.Conv2d, norm: nn.Module, dtype: torch.dtype):
    """(weight in ``dtype``, bias in the per-channel dtype) of conv + norm folded."""
    sd = stat_dtype(dtype)
    scale, shift = norms.running_scale_shift(norm, sd)
    weight = (conv.weight.to(sd) * scale.view(-1, 1, 1, 1)).to(dtype)
    if weight.device.type != "cpu":
        # KRSC: both GPU backends read a tap's channels contiguously, and the CUDA
        # binding would copy any other layout on every call
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = shift if conv.bias is None else shift + conv.bias.to(sd) * scale
    return weight, bias


class FoldCache:
    """Folded tensors per (conv, norm) pair, valid while their tensors are unchanged."""

    def __init__(self, register: bool = True) -> None:
        # slot (module ids) -> (key, folded tensors, weak refs to the modules, dtype, the tensors' ids,
        # weak refs to their storages)
        self._entries: dict = {}
        if register:
            _register(self)  # last: another thread's optimizer hook may visit it at once

    # A copy of a module (deepcopy, pickle, DataParallel's replicas through __dict__) starts empty:
    # the folds belong to the original's tensors.
    def __getstate__(self):
        return {}

    def __deepcopy__(self, memo):
        return FoldCache()

    def __setstate__(self, state) -> None:
        self._entries = {}
        _register(self)

    def fold(self, conv: nn.Conv2d, norm: nn.Module, dtype: torch.dtype):
        """(weight, bias) of ``conv`` followed by ``norm``."""
        return self._cached((conv, norm), dtype, lambda: fold_uncached(conv, norm, dtype))

    def fold_projection(self, conv: nn.Conv2d, norm: nn.Module, shortcut_conv: nn.Conv2d,
                        shortcut_norm: nn.Module, dtype: torch.dtype):
        """(weight, shortcut weight, summed bias) of a last conv merged with its projection shortcut."""
        def compute():
            weight, bias = fold_uncached(conv, norm, dtype)
            s_weight, s_bias = fold_uncached(shortcut_conv, shortcut_norm, dtype)
            return weight, s_weight, bias + s_bias
        return self._cached((conv, norm, shortcut_conv, shortcut_norm), dtype, compute)

    def _cached(self, pairs, dtype: torch.dtype, compute):
        tensors = _tensors(pairs)
        # a compiler or jit.trace records the fold's ops, so the graph reads the weights, not a
        # cached fold baked in as a constant
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        ):
            return compute()
        key = _key(tensors, dtype, pairs)
        slot = tuple(map(id, pairs))
        entry = self._entries.get(slot) if key is not None else None
        if entry is not None and entry[0] == key and _anchored(entry[2], pairs) and _storages_alive(entry[5]):
            return entry[1]  # the hot path: a hit enters no context
        # out of inference mode: a fold made under it could not be saved for a later backward
        with torch.inference_mode(False), torch.no_grad():
            if key is None or _shared_cpu(tensors):
                return compute()
            folded = compute()
            if entry is not None and _fits(entry[1], folded):
                # in place: a CUDA graph captured with the old fold reads the new one. A refold only
                # marked stale (its tensors' versions unchanged) bumps no version either: an earlier
                # forward's graph saved the fold for its backward and, like torchvision's saved
                # weights, reads the current values (an eval() between two forwards of a perceptual
                # loss must not break the first one's backward); a real in-place update raises there,
                # as it does in torchvision.
                unversioned = entry[0][0] is _STALE and entry[0][1] == key
                for old, new in zip(entry[1], folded):
                    (old.data if unversioned else old).copy_(new)
                folded = entry[1]
            else:
                self._purge_dead()
        # weak references: an entry must not keep a module alive (DataParallel makes replicas per call)
        ids = frozenset(id(t) for t in tensors if t is not None)  # for mark_stale
        self._entries[slot] = (key, folded, _anchors(pairs), dtype, ids, _storage_anchors(tensors))
        return folded

    def mark_stale(self, tensor_ids: Optional[set] = None) -> None:
        """Every entry (``tensor_ids``: every entry reading one of those tensors) refolds, in place,
        at its next lookup: for writes no version counter saw."""
        for slot, entry in list(self._entries.items()):  # a snapshot: another thread may be folding
            if entry[0][0] is _STALE:  # already: every training step after an evaluation lands here
                continue
            if tensor_ids is None or not entry[4].isdisjoint(tensor_ids):
                self._entries[slot] = ((_STALE, entry[0]), *entry[1:])

    def refresh(self, force: bool = False) -> int:
        """Refold every entry whose tensors changed (``force``: every entry), in place where it fits;
        the number refolded. For CUDA graphs captured before an in-place weight update: refresh,
        then replay."""
        if force:
            self.mark_stale()
        count = 0
        for slot, (key, _, refs, dtype, _ids, storage_refs) in list(self._entries.items()):
            modules = [r() for r in refs]
            if any(m is None for m in modules):
                del self._entries[slot]
                continue
            tensors = _tensors(modules)
            if _key(tensors, dtype, modules) != key or not _storages_alive(storage_refs):
                with torch.no_grad():
                    (self.fold if len(modules) == 2 else self.fold_projection)(*modules, dtype)
                count += 1
        return count

    def _purge_dead(self) -> None:
        for slot, entry in list(self._entries.items()):
            if any(r() is None for r in entry[2]):
                self._entries.pop(slot, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _fits(old: tuple, new: tuple) -> bool:
    return all(o.shape == n.shape and o.dtype == n.dtype and o.device == n.device and o.stride() == n.stride()
               for o, n in zip(old, new))


# Every cache, for the optimizer hook below (weakly: a cache lives as long as its module). The lock:
# a thread training while another copies and evaluates a model adds caches during the hook's loop.
_LIVE_CACHES: "weakref.WeakSet[FoldCache]" = weakref.WeakSet()
_LIVE_CACHES_LOCK = threading.Lock()


# What a block whose cache does not exist yet hands its chain while torch.compile traces: traced
# code never reads or writes folds (``_cached`` computes them), and creating a block's own cache
# there would add to _LIVE_CACHES: a global side effect that a traced torch.utils.checkpoint refuses
# (a graph break, its recomputation then updating BN's running stats twice) and a guard on the set.
TRACING_CACHE = FoldCache(register=False)


def _register(cache: FoldCache) -> None:
    with _LIVE_CACHES_LOCK:  # never while tracing: a block's first traced call gets TRACING_CACHE
        _LIVE_CACHES.add(cache)


@torch.compiler.disable  # a compiled optimizer step runs it eagerly, untraced
def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Torch's fused optimizers (``fused=True``) write parameters without bumping their version
    counters: after any optimizer step, the folds that read its parameters refold."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with _LIVE_CACHES_LOCK:
        caches = list(_LIVE_CACHES)
    for cache in caches:
        cache.mark_stale(stepped)


_OPTIMIZER_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)
