"""Fused residual blocks that keep torchvision's contract.

``FusedBasicBlock`` / ``FusedBottleneck`` subclass torchvision's blocks: same
constructor, errors, attributes, parameter order and state_dict keys; only
``forward`` differs, and it runs the block as one fused chain (``chain.py``).
The CIFAR block of He et al. (2015) and the plain (no-shortcut) blocks come in
an unfused form (the reference a user compares with) and a fused subclass.

What the fused ops cannot express (a norm that is not a batch norm, a training
SyncBatchNorm, a non-ReLU activation, an exotic conv, an inner module with hooks)
runs as given, with one warning per configuration; under a forced backend it
raises instead.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

from . import backends
from ._warnings import warn_once
from .chain import IDENTITY, NONE, Shortcut, hooks_reason, own_forward_reason, pair_unfusable_reason, run_chain
from .folding import TRACING_CACHE, FoldCache


def _transform_we_cannot_follow(x) -> Optional[str]:
    """The transform running a forward that the fused ops cannot serve, or None: FX symbolic tracing
    cannot follow the fused path's Python decisions, and the custom ops have no jvp or
    functorch-grad rules (their vmap rule is a loop over the batch: torchvision's ops do better)."""
    if isinstance(x, torch.fx.Proxy):
        return "FX symbolic tracing (create_feature_extractor, FX quantization)"
    if torch.compiler.is_compiling():
        return None
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform (grad, vmap, jacrev, jvp, functional ensembles)"
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return "forward-mode AD"
    return None


class FusedModule:
    """Mixin: run ``_fused_layers()`` + ``_fused_shortcut()`` as a fused chain.

    ``backend`` (None: ``FUSED_RESBLOCK_BACKEND`` or auto) is a plain
    attribute, so it is not part of the state_dict.
    """

    backend: Optional[str] = None
    # (conv, norm) child names of the chain, in order
    FUSED_LAYERS: tuple = ()

    # -- what a fused module says about itself
    def _fused_layers(self) -> list:
        # from _modules: nn.Module.__getattr__ costs ~1 us a child, on every forward
        children = self._modules
        return [(children[conv], children[norm]) for conv, norm in self.FUSED_LAYERS]

    def _fused_shortcut(self) -> Shortcut:
        return NONE

    def _unfused_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # -- shared machinery
    @property
    def fold_cache(self) -> FoldCache:
        cache = self.__dict__.get("_fold_cache")
        if cache is None:
            if torch.compiler.is_compiling():
                return TRACING_CACHE  # no module state written while tracing (folding.TRACING_CACHE)
            cache = self.__dict__["_fold_cache"] = FoldCache()
        return cache

    def _unfusable_reason(self, layers) -> Optional[str]:
        for conv, norm in layers:
            reason = pair_unfusable_reason(conv, norm)
            if reason:
                return reason
        children = self._modules
        relu = children["relu"] if "relu" in children else getattr(self, "relu", None)
        if relu is not None:
            if type(relu) is not nn.ReLU:
                return f"activation {type(relu).__name__} is not nn.ReLU"
            return hooks_reason(relu)
        return None

    def _fused_forward(self, x: Tensor, final_relu: bool = True) -> Tensor:
        transform = _transform_we_cannot_follow(x)
        if transform is not None:
            return self._transformed_forward(x, transform)
        layers = self._fused_layers()
        reason = self._unfusable_reason(layers)
        if reason is not None:
            return self._run_unfused(x, reason)
        return run_chain(x, layers, self._fused_shortcut(), final_relu, self.fold_cache, self.backend)

    def _transformed_forward(self, x, transform: str):
        # the module's own ops, which every transform of PyTorch's supports, compute the same
        warn_once(("transform", transform, type(self).__name__),
                  f"fused_resblock: under {transform} {type(self).__name__} runs unfused (torchvision's ops): "
                  "the same numbers, unfused; torch.compile and torch.export keep the fused ops")
        return self._unfused_forward(x)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it
        raise RuntimeError(
            f"fused_resblock: {type(self).__name__} cannot be scripted (TorchScript compiles neither its "
            "fold cache nor its backend dispatch); use torch.compile or torch.export, which run the fused "
            "ops, or script the unfused model: frb.revert(copy.deepcopy(model))")

    # -- the fold cache follows the module
    def train(self, mode: bool = True):
        # weights written through .data (p.data.mul_(), older EMA code) bump no version counter:
        # every mode switch marks the folds stale, so the next eval forward refolds (in place)
        result = super().train(mode)
        cache = self.__dict__.get("_fold_cache")
        if cache is not None:
            cache.mark_stale()
        return result

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda() made new tensors: the folds of the old ones would only hold memory
        result = super()._apply(fn, recurse)
        cache = self.__dict__.get("_fold_cache")
        if cache is not None:
            cache.clear()
        return result

    def _replicate_for_data_parallel(self):
        # DataParallel copies __dict__ per replica: each replica's folds are its own tensors', and
        # replicas run in parallel threads, so they must not share (nor race on) the original's cache
        replica = super()._replicate_for_data_parallel()
        replica.__dict__.pop("_fold_cache", None)
        return replica

    def _run_unfused(self, x: Tensor, reason: str) -> Tensor:
        name = backends.resolve_name(self.backend)
        if name != "auto":
            raise backends.BackendUnsupportedError(
                f"{type(self).__name__}: backend {name!r} (forced) cannot fuse this block: {reason}"
            )
        warn_once((type(self).__name__, reason),
                  f"fused_resblock: {type(self).__name__} runs unfused (as given): {reason}")
        return self._unfused_forward(x)

    def _downsample_shortcut(self, downsample: Optional[nn.Module]) -> Shortcut:
        """torchvision's ``downsample``: None, the standard Sequential(conv, norm), or any module."""
        if downsample is None:
            return IDENTITY
        if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
            conv, norm = downsample[0], downsample[1]
            reason = (own_forward_reason(downsample, nn.Sequential) or hooks_reason(downsample)
                      or pair_unfusable_reason(conv, norm))
            if reason is None:
                return Shortcut("projection", conv=conv, norm=norm)
        else:
            reason = f"downsample {type(downsample).__name__} is not Sequential(Conv2d, BatchNorm2d)"
        return self._shortcut_as_given(downsample, "downsample", reason)

    def _shortcut_as_given(self, module: nn.Module, what: str, reason: str) -> Shortcut:
        warn_once((type(self).__name__, what, reason),
                  f"fused_resblock: {type(self).__name__}'s {what} runs unfused (as given): {reason}")
        return Shortcut("module", module=module)


# --------------------------------------------------------------------------- torchvision blocks
class FusedBasicBlock(FusedModule, BasicBlock):
    """torchvision's BasicBlock, fused: 2 launches in eval (projection merged into the second)."""

    FUSED_LAYERS = (("conv1", "bn1"), ("conv2", "bn2"))

    def _fused_shortcut(self):
        return self._downsample_shortcut(self.downsample)

    def _unfused_forward(self, x):
        return BasicBlock.forward(self, x)

    def forward(self, x: Tensor) -> Tensor:
        return self._fused_forward(x)


class FusedBottleneck(FusedModule, Bottleneck):
    """torchvision's Bottleneck (v1.5), fused: 3 launches in eval (projection merged into the third)."""

    FUSED_LAYERS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def _fused_shortcut(self):
        return self._downsample_shortcut(self.downsample)

    def _unfused_forward(self, x):
        return Bottleneck.forward(self, x)

    def forward(self, x: Tensor) -> Tensor:
        return self._fused_forward(x)


# --------------------------------------------------------------------------- plain (no shortcut)
class PlainBasicBlock(nn.Module):
    """The paper's plain block: BasicBlock's two convs without the shortcut.

    Takes BasicBlock's constructor so ``torchvision.models.ResNet`` can build a
    plain net; a ``downsample`` passed in is ignored (plain nets have none).
    """

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("PlainBasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in PlainBasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


class FusedPlainBasicBlock(FusedModule, PlainBasicBlock):
    FUSED_LAYERS = (("conv1", "bn1"), ("conv2", "bn2"))

    def _unfused_forward(self, x):
        return PlainBasicBlock.forward(self, x)

    def forward(self, x: Tensor) -> Tensor:
        return self._fused_forward(x)


# --------------------------------------------------------------------------- CIFAR (He et al. 2015, §4.2)
class ZeroPadShortcut(nn.Module):
    """Option A: identity subsampled by ``stride``, zero channels padded ``planes // 4`` before and after."""

    def __init__(self, planes: int, stride: int = 2) -> None:
        super().__init__()
        self.planes, self.stride = planes, stride
        self.offset = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.offset, self.planes - self.offset - x.shape[1]))

    def extra_repr(self) -> str:
        return f"planes={self.planes}, stride={self.stride}"


SHORTCUT_OPTIONS = ("A", "B", "C", None)


class CifarBasicBlock(nn.Module):
    """The CIFAR residual block; ``shortcut``: "A" (zero-pad identity), "B" (projection where
    the shape changes), "C" (projection everywhere) or None (plain, no shortcut).

    The keys (``conv1, bn1, conv2, bn2, shortcut.0/1``) follow the widely used public checkpoints.
    """

    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Optional[str] = "A") -> None:
        super().__init__()
        if shortcut not in SHORTCUT_OPTIONS:
            raise ValueError(f"shortcut must be one of 'A', 'B', 'C' or None, got {shortcut!r}")
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.option = shortcut
        reshapes = stride != 1 or in_planes != planes
        if shortcut is None:
            self.shortcut = None
        elif shortcut == "C" or (shortcut == "B" and reshapes):
            self.shortcut = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
        elif shortcut == "A" and reshapes:
            if in_planes + planes // 4 > planes:
                raise ValueError(f"option A cannot pad {in_planes} channels to {planes}")
            self.shortcut = ZeroPadShortcut(planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out += self.shortcut(x)  # in place, as torchvision's blocks: out's dtype under autocast
        return self.relu(out)


class FusedCifarBasicBlock(FusedModule, CifarBasicBlock):
    FUSED_LAYERS = (("conv1", "bn1"), ("conv2", "bn2"))

    def _fused_shortcut(self):
        s = self.shortcut
        if s is None:
            return NONE
        for base in (nn.Identity, ZeroPadShortcut):
            if isinstance(s, base):  # fused only as its class computes it, where its hooks need no call
                reason = own_forward_reason(s, base) or hooks_reason(s)
                if reason is not None:
                    return self._shortcut_as_given(s, "shortcut", reason)
                return IDENTITY if base is nn.Identity else Shortcut("mapped", stride=s.stride, offset=s.offset)
        return self._downsample_shortcut(s)

    def _unfused_forward(self, x):
        return CifarBasicBlock.forward(self, x)

    def forward(self, x: Tensor) -> Tensor:
        return self._fused_forward(x)


class FusedStem(FusedModule):
    """Mixin for a network whose stem is ``conv1 -> bn1 -> relu``: run it as one fused conv."""

    FUSED_LAYERS = (("conv1", "bn1"),)

    def _unfused_forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))

    def _stem(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.is_cuda and x.dim() == 4:  # (an FX proxy is not a Tensor)
            # channels_last from here on: the GPU kernels work in NHWC, so an NCHW network would
            # convert every conv's input and write every output channel-strided; a network's
            # output (the classifier's) has no memory format to keep
            x = x.contiguous(memory_format=torch.channels_last)
        return self._fused_forward(x)
