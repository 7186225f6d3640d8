"""User code by reference: `package.module:function`, the escape hatch of every registry
(custom metrics, custom DPG targets, custom attribution metrics)."""

from __future__ import annotations

import importlib
from typing import Any

from datasteer.errors import ConfigError


def load_function(ref: str, what: str = "custom metric") -> Any:
    """The callable named by `package.module:function`, or a one-line ConfigError naming `what`."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} '{ref}' must be package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{what} '{ref}': cannot import {module_name} ({err}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what} '{ref}': {module_name} has no function {attr}")
    return fn
