"""Records: dataclass-like classes built without generating code.

They serve the start-up budget (sysbake.commands): `dataclasses.dataclass` exec()s the
source of each class's __init__, __repr__, __eq__, __hash__ and __setattr__, and its module
imports inspect, ast, dis and tokenize; with dataclasses a no-op `sysbake build` took half
as long again (BENCHMARKS.md, "No-op rebuild"). `record` gives a class the same methods as
shared functions driven by the class's list of fields.
Type checkers see it as a dataclass transform: constructors, frozen fields and `field()`
are checked as for dataclasses.

As in dataclasses: fields come from the class's own annotations, in order, after those of
its record bases (a redeclared field keeps its place and takes the new default);
`ClassVar` annotations are not fields; a default is the class attribute's value or given
by `field()`; `__post_init__` runs after __init__ has set the fields. Records are frozen
and hashed by their field values unless `frozen=False` (then unhashable). Not supported,
as no record needs it: InitVar, KW_ONLY, init/compare/hash per field, order, slots,
match_args, a generated __doc__, the refusal of mutable defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, TypeVar, dataclass_transform, overload

__all__ = [
    "MISSING",
    "Field",
    "FrozenInstanceError",
    "field",
    "fields",
    "is_record",
    "record",
    "replace",
]

_T = TypeVar("_T")
_LAYOUT: Final = "__record_layout__"  # the class attribute holding a record's _Layout
_NO_METADATA: Final[Mapping[str, Any]] = MappingProxyType({})


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()  # the default of a field that has none


class FrozenInstanceError(AttributeError):
    """An assignment to or deletion of an attribute of a frozen record."""


class Field:
    """One field of a record: its name, its default (MISSING when it has none) or the
    factory called for each instance, whether repr shows it, its metadata (read-only), and
    whether __init__ takes it by keyword only."""

    __slots__ = ("default", "default_factory", "kw_only", "metadata", "name", "repr")

    def __init__(
        self,
        default: object = MISSING,
        default_factory: Callable[[], object] | None = None,
        repr: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = ""  # set by @record
        self.default = default
        self.default_factory = default_factory
        self.repr = repr
        self.metadata = MappingProxyType(dict(metadata)) if metadata else _NO_METADATA
        self.kw_only = False


@overload
def field(*, default: _T, repr: bool = True, metadata: Mapping[str, Any] | None = None) -> _T: ...


@overload
def field(
    *,
    default_factory: Callable[[], _T],
    repr: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> _T: ...


@overload
def field(*, repr: bool = True, metadata: Mapping[str, Any] | None = None) -> Any: ...


def field(
    *,
    default: object = MISSING,
    default_factory: Callable[[], object] | None = None,
    repr: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """A field's default or default factory (for mutable values: one per instance), with
    repr=False to hide it from repr, or metadata for code reading `fields()`."""
    return Field(default, default_factory, repr, metadata)


class _Layout:
    """What the shared methods need of a record class: its fields, the names __init__
    takes by position, and whether it has a __post_init__."""

    __slots__ = ("fields", "positional", "post_init")

    def __init__(self, fields: tuple[Field, ...], post_init: bool) -> None:
        self.fields = fields
        self.positional = tuple(f.name for f in fields if not f.kw_only)
        self.post_init = post_init


@overload
def record(cls: type[_T], /) -> type[_T]: ...


@overload
def record(*, frozen: bool = True, kw_only: bool = False) -> Callable[[type[_T]], type[_T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(
    cls: type[_T] | None = None, /, *, frozen: bool = True, kw_only: bool = False
) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Make `cls` a record (see the module docstring): `@record` or
    `@record(frozen=..., kw_only=...)`."""
    if cls is None:
        return lambda cls: _build(cls, frozen, kw_only)
    return _build(cls, frozen, kw_only)


def _build(cls: type[_T], frozen: bool, kw_only: bool) -> type[_T]:
    own = cls.__dict__
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        if isinstance(layout := base.__dict__.get(_LAYOUT), _Layout):
            found.update((f.name, f) for f in layout.fields)
    for name, annotation in own.get("__annotations__", {}).items():
        # Annotations are strings under `from __future__ import annotations`.
        if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = own.get(name, MISSING)
        if isinstance(value, Field):  # the class attribute becomes the default, if any
            if value.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, value.default)
        f = value if isinstance(value, Field) else Field(value)
        f.name, f.kw_only = name, kw_only
        found[name] = f  # a redeclared base field keeps its place
    methods: dict[str, object] = {
        "__init__": _init,
        "__repr__": _repr,
        "__eq__": _eq,
        "__hash__": _hash if frozen else None,
    }
    if frozen:
        methods |= {"__setattr__": _frozen_setattr, "__delattr__": _frozen_delattr}
    if clash := sorted(methods.keys() & own.keys()):
        raise TypeError(f"{cls.__qualname__} defines {', '.join(clash)}, which @record makes")
    for name, method in methods.items():
        setattr(cls, name, method)
    setattr(cls, _LAYOUT, _Layout(tuple(found.values()), hasattr(cls, "__post_init__")))
    return cls


def _layout(obj: object) -> _Layout | None:
    layout = getattr(obj if isinstance(obj, type) else type(obj), _LAYOUT, None)
    return layout if isinstance(layout, _Layout) else None


def _values(obj: object) -> tuple[object, ...]:
    layout: _Layout = getattr(type(obj), _LAYOUT)
    return tuple(getattr(obj, f.name) for f in layout.fields)


def _init(self: Any, *args: object, **kwargs: object) -> None:
    cls = type(self)
    layout: _Layout = getattr(cls, _LAYOUT)
    if len(args) > len(layout.positional):
        raise TypeError(
            f"{cls.__qualname__}() takes {len(layout.positional)} positional "
            f"arguments but {len(args)} were given"
        )
    for name, value in zip(layout.positional, args, strict=False):
        if name in kwargs:
            raise TypeError(f"{cls.__qualname__}() got multiple values for argument {name!r}")
        kwargs[name] = value
    missing = []
    for f in layout.fields:
        if f.name in kwargs:
            value = kwargs.pop(f.name)
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not None:
            value = f.default_factory()
        else:
            missing.append(repr(f.name))
            continue
        object.__setattr__(self, f.name, value)
    if kwargs:
        raise TypeError(
            f"{cls.__qualname__}() got an unexpected keyword argument {next(iter(kwargs))!r}"
        )
    if missing:
        raise TypeError(
            f"{cls.__qualname__}() missing {len(missing)} required argument"
            f"{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
        )
    if layout.post_init:
        self.__post_init__()


def _repr(self: object) -> str:
    layout: _Layout = getattr(type(self), _LAYOUT)
    shown = (f"{f.name}={getattr(self, f.name)!r}" for f in layout.fields if f.repr)
    return f"{type(self).__qualname__}({', '.join(shown)})"


def _eq(self: object, other: object) -> object:  # bool, or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: object) -> int:
    return hash(_values(self))


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def fields(obj: object) -> tuple[Field, ...]:
    """The fields of a record or record class, in __init__ order; TypeError for others."""
    if (layout := _layout(obj)) is None:
        raise TypeError(f"fields() takes a record or record class, not {obj!r}")
    return layout.fields


def replace(obj: _T, /, **changes: Any) -> _T:
    """A new record like `obj` with `changes` to its fields; it is made by __init__, so a
    __post_init__ checks it again."""
    for f in fields(obj):
        changes.setdefault(f.name, getattr(obj, f.name))
    return type(obj)(**changes)


def is_record(obj: object) -> bool:
    """Whether `obj` is a record or a record class."""
    return _layout(obj) is not None
