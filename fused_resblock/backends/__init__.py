"""The backend registry: which module runs a fused op.

Every backend is one module exposing ``NAME``, ``available()``, ``supports(op,
config)`` and the fused functions whose contract is ``reference.py``. Nothing
above this package knows which backend ran.

Selection, per call:
* a forced backend (``backend=`` argument or ``FUSED_RESBLOCK_BACKEND``) runs or
  raises ``BackendUnsupportedError`` naming what it lacks; it never falls back;
* ``auto`` considers the backends of ``AUTO_ORDER`` that are available and
  support the configuration: one runs; of several, the faster per shape is
  measured once (``choice``, which also checks each against the reference on
  those arguments) where the op layer passes its arguments, else the first runs.
  With none on a CUDA device the fall back to ``reference`` warns once per
  configuration. On the CPU the reference is the intended path: no
  warning.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch

from .._warnings import warn_once

NAMES = ("reference", "triton", "cuda")
# Triton first where nothing is measured: its kernels are the same code the CPU
# interpreter tests; the CUDA extension's take over per shape when measured faster.
AUTO_ORDER = ("triton", "cuda")
ENV_VAR = "FUSED_RESBLOCK_BACKEND"

_modules: dict = {}
_choices: dict = {}


class FirstCallInCaptureError(RuntimeError):
    """A shape's first call came inside CUDA-graph capture, where CUDA forbids loading a kernel."""

    def __init__(self, what: str):
        super().__init__(
            f"fused_resblock: the first call of {what} is inside CUDA-graph capture, where kernels can be "
            "neither tuned nor loaded (CUDA forbids loading a module while a stream captures); run the model "
            "once with the same shapes before capturing it (the usual warm-up)")


class BackendUnsupportedError(NotImplementedError):
    """A forced backend cannot run the requested configuration."""


def conv_geometry_reason(config: dict) -> Optional[str]:
    """None when ``config`` describes a valid convolution a GPU grid can carry, else why not."""
    kh, kw = config["kernel"]
    if kh < 1 or kw < 1:
        return f"kernel {tuple(config['kernel'])} is empty"
    if min(config["stride"]) < 1 or min(config["dilation"]) < 1 or min(config["padding"]) < 0:
        return (f"stride {tuple(config['stride'])}, padding {tuple(config['padding'])}, "
                f"dilation {tuple(config['dilation'])} are not a valid convolution")
    groups = config["groups"]
    if groups < 1 or config["in_channels"] % groups or config["out_channels"] % groups:
        return (f"groups={groups} does not divide in_channels={config['in_channels']} "
                f"and out_channels={config['out_channels']}")
    if groups > 65535:  # both backends put the group on a grid axis limited to 65535
        return f"groups={groups} exceeds the CUDA grid limit of 65535"
    return config.get("indexing")  # set only for sizes past 32-bit row or depth indices (ops._config)


def _environment_value() -> Optional[str]:
    """``os.environ.get(ENV_VAR)``, read on every op call (it may change while the process runs),
    without the KeyError that ``get`` raises and catches inside when the variable is unset (~1.4 us)."""
    data, key = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if data is None or key is None:  # not CPython's os.environ
        return os.environ.get(ENV_VAR)
    raw = data.get(key(ENV_VAR))
    return None if raw is None else os.environ.decodevalue(raw)


def resolve_name(requested: Optional[str]) -> str:
    """The backend name in force: the argument, else the environment, else ``auto``."""
    env = _environment_value()
    try:
        return _resolved[(requested, env)]
    except (KeyError, TypeError):
        pass
    if requested is not None and not isinstance(requested, str):
        raise ValueError(f"backend must be a string (auto, {', '.join(NAMES)}) or None, got {requested!r}")
    name = (requested or env or "").strip().lower() or "auto"  # blank: unset
    if name != "auto" and name not in NAMES:
        raise ValueError(f"unknown fused_resblock backend {name!r}; expected one of auto, {', '.join(NAMES)}")
    if not torch.compiler.is_compiling():  # a write to module state would break a traced checkpoint
        _resolved[(requested, env)] = name
    return name


_resolved: dict = {}  # (requested, environment value) -> name


def get(name: str) -> ModuleType:
    """Import (once) and return the backend module ``name``."""
    module = _modules.get(name)
    if module is None:
        if name not in NAMES:
            raise ValueError(f"unknown fused_resblock backend {name!r}; expected one of {', '.join(NAMES)}")
        module = importlib.import_module(f"{__name__}.{name}")
        _modules[name] = module
    return module


def availability() -> dict:
    """{backend name: None if available here, else the reason}, for ``doctor``."""
    report = {}
    for name in NAMES:
        try:
            report[name] = get(name).available()
        except Exception as exc:  # a broken install must not break the report
            report[name] = f"import failed: {exc!r}"
    return report


def _unsupported(name: str, op: str, config: dict) -> Optional[str]:
    try:
        module = get(name)
    except ImportError as exc:
        return f"cannot import backend {name!r}: {exc}"
    reason = module.available()
    if reason is None:
        reason = module.supports(op, config)
    return reason


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def select(op: str, requested: Optional[str], config: dict,
           measure: Optional[Callable[[], Tuple[tuple, Callable[[ModuleType], object]]]] = None) -> ModuleType:
    """The backend module that runs ``op`` for ``config`` (see module docstring).

    ``measure()`` -> (shape key, run): with ``auto``, when several backends can
    run the call, ``run(module)`` times each once per shape and the fastest is
    kept (``choice``). Without it the first capable one runs.
    """
    name = resolve_name(requested)
    key = (op, name, tuple(config.items()))
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _candidates(op, name, config)
    if isinstance(choice, ModuleType):
        return choice
    if measure is None or len(choice) == 1:
        return choice[0]
    from .choice import CHOOSER

    shape_key, run = measure()
    return CHOOSER.choose(op, shape_key, choice, run, config["device"], reference=get("reference"))


def _candidates(op: str, name: str, config: dict):
    """A module when the choice is fixed, else the tuple of ``auto``'s capable backends (in order)."""
    if name != "auto":
        reason = _unsupported(name, op, config)
        if reason is not None:
            raise BackendUnsupportedError(
                f"fused_resblock backend {name!r} (forced) cannot run {op} for {_describe(config)}: {reason}"
            )
        return get(name)
    if _device_type(config) == "cpu":
        return get("reference")  # kernels run on the CPU only under Triton's interpreter: a test mode
    capable, reasons = [], []
    for candidate in AUTO_ORDER:
        reason = _unsupported(candidate, op, config)
        if reason is None:
            capable.append(get(candidate))
        else:
            reasons.append(f"{candidate}: {reason}")
    if not capable:
        _warn_fallback(op, config, reasons)
        return get("reference")
    return tuple(capable)


def _device_type(config: dict) -> str:
    device = config.get("device")
    return getattr(device, "type", str(device))


def _warn_fallback(op: str, config: dict, reasons: list) -> None:
    warn_once(
        ("backend", op, tuple(config.items())),
        f"fused_resblock: no fused kernel for {op} with {_describe(config)} "
        f"({'; '.join(reasons)}); running the unfused reference implementation",
        stacklevel=6,
    )


def clear_caches() -> None:
    """Forget selections (tests; after changing the environment)."""
    _choices.clear()
