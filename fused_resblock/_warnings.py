"""One warning category and one-warning-per-configuration, shared by the package."""
from __future__ import annotations

import warnings

_seen: set = set()


class FusedResblockFallbackWarning(UserWarning):
    """Something ran unfused (the reference implementation or the module as given)."""


def warn_once(key, message: str, stacklevel: int = 3) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process."""
    if key in _seen:
        return
    warnings.warn(message, FusedResblockFallbackWarning, stacklevel=stacklevel)
    _seen.add(key)  # after: under warnings-as-errors every call raises, none runs on silently


def reset() -> None:
    """Forget which warnings were given (tests)."""
    _seen.clear()
