"""One registry class for models, losses, methods and recipes."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map that refuses duplicates and lists names with wildcards.

    >>> models = Registry("model")
    >>> @models.register("tiny")
    ... def tiny(num_classes): ...
    """

    def __init__(self, kind: str, list_hint: str = "") -> None:
        self.kind = kind
        self.list_hint = list_hint
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._items, n=3)
        msg = f"unknown {self.kind} '{name}'"
        if close:
            msg += f" (did you mean {', '.join(close)}?)"
        if self.list_hint:
            msg += f"; see `{self.list_hint}`"
        return msg

    def names(self, pattern: str | None = None) -> list[str]:
        names = list(self._items)
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        return names

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
