"""One registry with several kinds; components register themselves by decorator.

    @registry.register("adapter", "qwen_resampler")
    class QwenResampler(nn.Module): ...

    registry.get("adapter", "qwen_resampler")   # -> QwenResampler
    registry.list("adapter")                     # -> ["linear", "mlp", "qwen_resampler"]
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TypeVar

KINDS = (
    "model",
    "vision_encoder",
    "adapter",
    "llm",
    "builder",
    "processor",
    "task",
    "eval_task",
    "runner",
    "strategy",
    "lr_scheduler",
    "freeze_policy",
    "logger",
    "synthetic_world",
)

T = TypeVar("T")

# Modules whose import registers the built-in components.
_BUILTIN_MODULES = (
    "lavis.models",
    "lavis.processors",
    "lavis.datasets",
    "lavis.datasets.synthetic",
    "lavis.tasks",
    "lavis.runners",
    "lavis.common.optim",
    "lavis.tracking.loggers",
)


class RegistryError(KeyError):
    """An unknown kind or name; the message lists the valid names and the closest match."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''.

    A choice that contains what was typed as a whole part (``llava`` in ``llava_conversation``) wins
    over one that merely shares letters (``vqa``); otherwise difflib's closest match.
    """
    typed, names = str(name).lower(), [str(c) for c in choices]
    parts = [c for c in names if typed and typed in c.lower().replace("-", "_").split("_")]
    close = parts[:1] or difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """Maps (kind, name) to a class or function."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, object]] = {kind: {} for kind in KINDS}
        self._builtins_loaded = False

    def _check_kind(self, kind: str) -> dict[str, object]:
        if kind not in self._entries:
            raise RegistryError(
                f"unknown registry kind '{kind}'{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}"
            )
        return self._entries[kind]

    def register(self, kind: str, name: str) -> Callable[[T], T]:
        """Decorator registering a class or function under ``kind``/``name``."""
        entries = self._check_kind(kind)

        def wrap(obj: T) -> T:
            if name in entries and entries[name] is not obj:
                raise ValueError(f"{kind} '{name}' is already registered by {entries[name]!r}")
            entries[name] = obj
            if "registry_name" not in vars(obj):  # an object registered under two names keeps its first
                obj.registry_name = name
            return obj

        return wrap

    def load_builtins(self) -> None:
        """Import the library's modules so that their components are registered."""
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in _BUILTIN_MODULES:
                importlib.import_module(module)

    def get(self, kind: str, name: str):
        """The component registered as ``kind``/``name``; unknown names list the valid ones."""
        self.load_builtins()
        entries = self._check_kind(kind)
        if name not in entries:
            names = sorted(entries)
            raise RegistryError(
                f"unknown {kind} '{name}'{did_you_mean(name, names)}; registered {kind} names: "
                f"{', '.join(names) or '(none)'}"
            )
        return entries[name]

    def list(self, kind: str) -> list[str]:
        """Sorted names registered under ``kind``."""
        self.load_builtins()
        return sorted(self._check_kind(kind))


registry = Registry()
