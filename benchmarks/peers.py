"""Who runs a case: ours (each backend, auto, auto in a CUDA graph) and the peers we compare with.

Each implementation says whether it is defined for a case at all
(``applies``: BN folding means nothing in training), why it cannot run here
(``unavailable``: recorded as a skipped case, never dropped), how it treats
the case's dtype (``precision``), and builds the step to time from a freshly
built plain module.

dtype policy, the same for ours and the peers: inference runs the module and
input in the case's dtype (fp32 with TF32 allowed); training and fine-tuning run
fp32 master weights under autocast to the case's dtype, the usual mixed-precision recipe.
``eager-amp`` is inference under autocast with fp32 weights (what a user gets
from wrapping an unchanged model in autocast).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from fused_resblock import backends
from fused_resblock.folding import fold_uncached

from . import workloads
from .cases import OURS_PREFIX, Case
from .workloads import Precision

SMALL_BATCH = 8  # CUDA graphs (ours and reduce-overhead) are run up to this batch


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_step(module: nn.Module, device: torch.device, autocast: Optional[torch.dtype]) -> Callable:
    def step(inputs):
        with torch.no_grad(), _autocast(device, autocast):
            return module(*inputs)
    return step


def train_step(module: nn.Module, spec, case: Case, device: torch.device, autocast: Optional[torch.dtype],
               trainable: Optional[nn.Module] = None) -> Callable:
    """fwd + loss + bwd + SGD step on the parameters that take a gradient (fine-tuning: the convs, not the
    frozen BNs); ``trainable`` owns the parameters when ``module`` wraps it (compile)."""
    params = [p for p in (trainable or module).parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step(inputs):
        args, loss_args = workloads.split_input(spec, case, inputs)
        with _autocast(device, autocast):
            loss = workloads.loss(spec, module(*args), loss_args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for t in args:  # an input's gradient (a single conv's dgrad) is dropped, not accumulated
            t.grad = None
        return loss
    return step


class Impl:
    """An implementation of every case it applies to; subclasses override what differs."""

    name = ""
    modes = ("infer", "train", "finetune")

    def applies(self, case: Case) -> bool:
        return case.mode in self.modes

    def unavailable(self, case: Case, device: torch.device) -> Optional[str]:
        return None

    def precision(self, case: Case) -> Precision:
        if case.has_backward:
            return Precision(torch.float32, torch.float32, case.torch_dtype if case.reduced_precision else None)
        return Precision(case.torch_dtype, case.torch_dtype)

    def context(self, case: Case):
        """Held for the whole case (compile settings read at compile time)."""
        return contextlib.nullcontext()

    def transform(self, module: nn.Module, case: Case) -> nn.Module:
        return module

    def build(self, module: nn.Module, spec, case: Case, device: torch.device) -> Callable:
        autocast = self.precision(case).autocast
        runnable = self.transform(module, case)
        if case.has_backward:
            return train_step(runnable, spec, case, device, autocast, trainable=module)
        return forward_step(runnable, device, autocast)

    def cleanup(self) -> None:
        pass


class Ours(Impl):
    """Our fused modules on one backend ("auto": the library's own choice per op)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = OURS_PREFIX + backend

    def unavailable(self, case, device):
        if self.backend == "auto":
            return None
        return backends.availability().get(self.backend)

    def transform(self, module, case):
        return workloads.fuse(module, self.backend)


class OursCudaKernel(Ours):
    """Ours on the cuda backend with one of its kernels forced (``cuda.PIPELINES``): a kernel's A/B in one run."""

    modes = ("infer",)

    def __init__(self, pipeline: str) -> None:
        super().__init__("cuda")
        self.pipeline = pipeline
        self.name = f"{OURS_PREFIX}cuda[{pipeline}]"

    def applies(self, case):
        return super().applies(case) and case.reduced_precision  # the cuda backend's dtypes

    def context(self, case):
        from fused_resblock.backends import cuda

        return cuda.forced_pipeline(self.pipeline)


class OursCudaGraph(Ours):
    """Ours (auto) captured once in a CUDA graph and replayed: the small-batch, launch-bound path."""

    modes = ("infer",)

    def __init__(self) -> None:
        super().__init__("auto")
        self.name = OURS_PREFIX + "auto+cudagraph"

    def applies(self, case):
        return super().applies(case) and case.batch <= SMALL_BATCH

    def unavailable(self, case, device):
        return None if device.type == "cuda" else "CUDA graphs need a CUDA device"

    def build(self, module, spec, case, device):
        forward = forward_step(self.transform(module, case), device, self.precision(case).autocast)
        graph = {}

        def step(inputs):
            if not graph:
                graph.update(_capture(forward, inputs))
            for static, given in zip(graph["inputs"], inputs):
                static.copy_(given)
            graph["graph"].replay()
            return graph["output"]
        return step


def _capture(forward: Callable, example: tuple) -> dict:
    """Warm ``forward`` up on a side stream (fold caches, autotuning), then capture it."""
    static = tuple(t.clone() for t in example)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            output = forward(static)
    finally:
        # a failed capture raises in torch.cuda.graph's exit before it restores the stream: every
        # later case would otherwise run on the capture stream
        torch.cuda.set_stream(stream)
    return {"graph": graph, "inputs": static, "output": output}


class Eager(Impl):
    name = "eager"


class EagerAmp(Impl):
    """Inference of the unchanged fp32 model under autocast."""

    name = "eager-amp"
    modes = ("infer",)

    def applies(self, case):
        return super().applies(case) and case.reduced_precision

    def precision(self, case):
        return Precision(torch.float32, torch.float32, case.torch_dtype)


class EagerFolded(Impl):
    """Eager inference with every BN folded into its conv (weights and bias rewritten, BN removed)."""

    name = "eager-folded"
    modes = ("infer",)

    def transform(self, module, case):
        return fold_batchnorms(module).to(memory_format=case.torch_format)


def _conv_bn_pairs(parent: nn.Module):
    """(conv name, BN name) pairs directly inside ``parent``: convN/bnN attributes or Sequential neighbours."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:])
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], nn.BatchNorm2d)]
    return [("conv" + name[2:], name) for name, child in children.items()
            if name.startswith("bn") and isinstance(child, nn.BatchNorm2d)
            and isinstance(children.get("conv" + name[2:]), nn.Conv2d)]


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold each eval-mode (conv, BN) pair of ``module`` into the conv, in place; the BN becomes Identity."""
    with torch.no_grad():
        for parent in list(module.modules()):
            for conv_name, bn_name in _conv_bn_pairs(parent):
                conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
                weight, bias = fold_uncached(conv, bn, conv.weight.dtype)
                conv.weight = nn.Parameter(weight, requires_grad=False)
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
                setattr(parent, bn_name, nn.Identity())
    return module


class Compiled(Impl):
    """torch.compile of the plain module; inference compiles with freezing (weights as constants)."""

    def __init__(self, mode: str, modes=("infer", "train", "finetune"), small_batch_only: bool = False) -> None:
        self.mode, self.modes, self.small_batch_only = mode, modes, small_batch_only
        self.name = f"compile-{mode}"

    def applies(self, case):
        return super().applies(case) and (not self.small_batch_only or case.batch <= SMALL_BATCH)

    def unavailable(self, case, device):
        if device.type != "cuda":
            return "torch.compile peers are skipped on the CPU: compiling dwarfs the smoke run"
        return None

    def context(self, case):
        if case.mode == "infer":
            import torch._inductor.config as inductor_config
            return inductor_config.patch(freezing=True)
        return contextlib.nullcontext()

    def transform(self, module, case):
        # max-autotune's own mode also captures CUDA graphs; the peer is max-autotune's kernels
        # without them, like ours and compile-default (reduce-overhead is the graphs peer)
        mode = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(self.mode, self.mode)
        return torch.compile(module, mode=mode)

    def cleanup(self):
        # a fresh Dynamo per case: compiled code of one model must not count against the next one's cache limit
        torch._dynamo.reset()


def all_impls() -> list:
    """Every implementation, ours first, in the order rows are reported."""
    return [
        Ours("auto"), *(Ours(name) for name in backends.NAMES), OursCudaKernel("wmma"), OursCudaGraph(),
        Eager(), EagerAmp(), EagerFolded(),
        Compiled("default"),
        Compiled("max-autotune", modes=("infer",)),
        Compiled("reduce-overhead", modes=("infer",), small_batch_only=True),
    ]


def by_name() -> dict:
    return {impl.name: impl for impl in all_impls()}

