"""Name registries: the stable strings that configs, benchmarks and CLIs refer to.

A :class:`Registry` maps snake_case names to classes (or factories). Names are saved in
configs and checkpoints, so they never change silently: a renamed entry keeps its old name
as an alias.

Example:
    >>> from trajflow.registry import Registry
    >>> SHAPES: Registry[type] = Registry("shape")
    >>> @SHAPES.register("square")
    ... class Square:
    ...     def __init__(self, side: float = 1.0):
    ...         self.side = side
    >>> SHAPES.build({"name": "square", "kwargs": {"side": 2.0}}).side
    2.0
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Spec(BaseModel):
    """A registered name and the keyword arguments to build it with.

    Example:
        >>> Spec(name="affine_coupling", kwargs={"features": 4})
        Spec(name='affine_coupling', kwargs={'features': 4})
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registered snake_case name.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments.")

    @field_validator("name")
    @classmethod
    def _snake_case(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"expected a snake_case registry name, got {value!r}")
        return value


#: Block specifications are plain specs; the alias reads better in block configs.
BlockSpec = Spec


class Registry(Generic[T]):
    """A mapping from stable names to registered classes or factories.

    Args:
        kind: What the registry holds ("block", "schedule", ...), used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator registering an entry under ``name`` (and optional old names).

        Raises:
            ValueError: If the name is not snake_case or is already taken.
        """
        for key in (name, *aliases):
            if not _NAME.match(key):
                raise ValueError(f"{self.kind} names must be snake_case, got {key!r}")
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} name {key!r} is already registered")

        def decorator(entry: T) -> T:
            self._entries[name] = entry
            for alias in aliases:
                self._aliases[alias] = name
            if isinstance(entry, type):
                entry.registered_name = name  # type: ignore[attr-defined]
            return entry

        return decorator

    def get(self, name: str) -> T:
        """Returns the entry registered under ``name`` or one of its aliases.

        Raises:
            KeyError: If the name is unknown; the message lists the known names.
        """
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[key]

    def check(self, name: str) -> str:
        """Returns ``name`` if it is registered, for config validators.

        Raises:
            ValueError: If it is not (pydantic turns ValueErrors, not KeyErrors, into
                validation errors naming the field); the message lists the known names.
        """
        try:
            self.get(name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        return name

    def names(self) -> list[str]:
        """The canonical registered names, sorted (aliases excluded)."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        """The registered entries, in the order of :meth:`names`."""
        return [self._entries[name] for name in self.names()]

    def build(self, spec: Spec | Mapping[str, Any] | str, **overrides: Any) -> Any:
        """Instantiates an entry from a spec, a ``{"name", "kwargs"}`` mapping or a bare name.

        Keyword ``overrides`` are merged over the spec's kwargs.

        Raises:
            KeyError: For an unknown name.
            TypeError: For keyword arguments the entry does not accept; the message shows its
                signature.
        """
        if isinstance(spec, str):
            spec = Spec(name=spec)
        elif not isinstance(spec, Spec):
            spec = Spec.model_validate(dict(spec))
        entry = self.get(spec.name)
        kwargs = {**spec.kwargs, **overrides}
        try:
            signature = inspect.signature(entry)  # type: ignore[arg-type]
            signature.bind(**kwargs)
        except TypeError as error:
            raise TypeError(
                f"cannot build {self.kind} {spec.name!r} with {sorted(kwargs)}: {error}; "
                f"expected {spec.name}{signature}"
            ) from None
        except ValueError:  # builtins without a signature: let the call decide
            pass
        return entry(**kwargs)  # type: ignore[operator]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
