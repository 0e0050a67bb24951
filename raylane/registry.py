"""A name → implementation table, used wherever a config picks an algorithm variant by name.

Besides a registered name, a table accepts an import path ``"pkg.module:attribute"``: the
module is imported and the attribute is the entry. A path works in any process that can
import the module, Ray actors included, where a name registered by a driver script does not
exist.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries keyed by name; ``kind`` names the table in error messages ("advantage estimator")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated object under ``name``; a name can be taken only once."""
        if ":" in name:
            raise ValueError(f"{self.kind} name {name!r} must not contain ':' (it marks an import path)")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The entry for a registered ``name`` or an import path ``"pkg.module:attribute"``.

        An unknown name raises ``ValueError`` listing the registered ones; a path whose module
        or attribute cannot be found raises ``ValueError`` saying which.
        """
        if ":" in name:
            return self._import(name)
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())} "
                "(or give an import path 'pkg.module:attribute')"
            ) from None

    def _import(self, path: str) -> T:
        module_name, _, attribute = path.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"{self.kind} import path {path!r} must read 'pkg.module:attribute'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{self.kind} {path!r}: cannot import module {module_name!r} ({err})") from None
        try:
            return getattr(module, attribute)
        except AttributeError:
            raise ValueError(f"{self.kind} {path!r}: module {module_name!r} has no {attribute!r}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def name_field(self) -> Any:
        """A pydantic ``str`` type accepting only names (or import paths) this table resolves.

        The check runs when the config is validated, so a typo fails at load time with the
        registered names rather than inside a worker; an entry registered before the config
        loads (by the user's own code) is accepted.
        """

        def check(name: str) -> str:
            self.get(name)
            return name

        return Annotated[str, AfterValidator(check)]
