"""Helpers for wiring event handlers, shared by the tabs (not a tab: no tab imports another tab)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


def bind(handler: Callable[..., Any], *bound: Any) -> Callable[..., Any]:
    """``functools.partial`` for event handlers that keeps the type hints gradio reads (gr.Request, gr.LikeData),
    which a plain partial hides (gradio then hands None for the request); generators stay generators, so
    streaming still streams."""
    if inspect.isgeneratorfunction(handler):
        def call(*args: Any, **kwargs: Any) -> Any:
            yield from handler(*bound, *args, **kwargs)
    else:
        def call(*args: Any, **kwargs: Any) -> Any:
            return handler(*bound, *args, **kwargs)
    functools.update_wrapper(call, handler)
    parameters = list(inspect.signature(handler).parameters.values())[len(bound):]
    call.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return call
