"""Public names that changed, and the deprecation path of each.

A DAG author's old name keeps working for a while: it is taken as the new one and a
``DeprecationWarning`` names the new one, pointing at the author's line (not at ours). Giving
the old and the new name together is an error, since which one should win is not obvious.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_renamed(old: str, new: str, where: str) -> None:
    """Warn that ``old`` (of ``where``) is deprecated in favour of ``new``, at the author's line.

    The line is found here, not given as a ``stacklevel``: how many frames lie between depends
    on the way in (a spec, its Airflow subclass, an operator through Airflow's wrapper).
    """
    frame = _authors_frame()
    warnings.warn_explicit(
        f"{where}: {old!r} is deprecated, use {new!r} (same meaning)", DeprecationWarning,
        frame.f_code.co_filename, frame.f_lineno, module=frame.f_globals.get("__name__"),
        registry=frame.f_globals.setdefault("__warningregistry__", {}), module_globals=frame.f_globals,
    )


def both_given(old: str, new: str, where: str) -> str:
    """The message of the error raised when ``old`` and ``new`` are given together."""
    return f"{where}: {old!r} is the deprecated name of {new!r}; give only {new!r}"


def take_renamed(values: dict[str, Any], renames: Mapping[str, str], where: str, error: type[Exception] = TypeError) -> dict[str, Any]:
    """``values`` (keyword arguments, a spec dict) with each old name of ``renames`` (old ->
    new) moved to its new one, warning; ``error`` if both are present. Returns a new dict."""
    values = dict(values)
    for old, new in renames.items():
        if old not in values:
            continue
        if new in values:
            raise error(both_given(old, new, where))
        warn_renamed(old, new, where)
        values[new] = values.pop(old)
    return values


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorate a function (an operator's ``__init__``) to accept each old keyword (``old=new``).

    The signature it shows stays the new one (``functools.wraps``): Airflow's default_args and
    ``partial()`` see only the new names.
    """

    def decorate(func: F) -> F:
        where = func.__qualname__.removesuffix(".__init__")

        @functools.wraps(func)
        def accepting_old_names(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **take_renamed(kwargs, renames, where))

        return accepting_old_names  # type: ignore[return-value]

    return decorate


def _authors_frame() -> FrameType:
    """The first frame outside this package, dataclasses' generated ``__init__`` and Airflow's
    operator wrapper: the DAG author's line."""
    frame = sys._getframe(1)
    while frame.f_back is not None and _is_ours(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _is_ours(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or filename == "<string>" or f"{os.sep}airflow{os.sep}sdk{os.sep}" in filename
