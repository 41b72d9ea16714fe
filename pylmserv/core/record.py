"""Record: the one base for pylmserv's immutable value records (a frozen dataclass, cheaper).

    class Shard(Record):
        __slots__ = ("file", "url", "hash", "size")   # the fields, in order, after the parent's
        _defaults = {"size": None}                    # merged over the parent's; may override one
        file: str                                     # annotations: documentation only
        ...

    class Lock(Record):
        __slots__ = ("path", "sources")
        _defaults = {"sources": Factory(dict)}        # a fresh dict for every instance

Instances are immutable, compared by value and type, unhashable unless a subclass defines
`__hash__` (`__hash__ = hash_by_value` for records of hashable values, as a frozen dataclass
hashed), pickle and copy by value; `replace(**changes)` is dataclasses.replace and
`field_names(cls_or_record)` lists the fields in order.
"""
from __future__ import annotations

from collections.abc import Callable

# Why not frozen dataclasses: the up-to-date `build` path imports these records, and creating
# a dataclass costs ~4 M instructions at import (generated code, exec'd); a Record subclass
# costs a class statement plus the small bookkeeping in __init_subclass__.

_set = object.__setattr__


class Factory:
    """A default made fresh for each instance: `Factory(dict)` (dataclasses' default_factory)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]):
        self.make = make

    def __repr__(self) -> str:
        return f"Factory({self.make!r})"


class Record:
    """Immutable, `__slots__`-based, compared by value. See the module docstring."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()  # all fields in order, parents' first (set per class)
    _defaults: dict[str, object] = {}  # declared: this class's; after creation: merged with the parents'

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__slots__", ())
        own = (own,) if isinstance(own, str) else tuple(own)
        parent = super(cls, cls)
        fields = parent._fields + own
        defaults = {**parent._defaults, **cls.__dict__.get("_defaults", {})}
        if len(set(fields)) != len(fields):
            raise TypeError(f"{cls.__name__}: a field is declared twice in {fields}")
        unknown = set(defaults) - set(fields)
        if unknown:
            raise TypeError(f"{cls.__name__}: default(s) for no field: {', '.join(sorted(unknown))}")
        cls._fields = fields
        cls._defaults = defaults

    def __init__(self, *args, **kwargs):
        cls = type(self)
        names = cls._fields
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments but {len(args)} were given")
        for name, value in zip(names, args):
            _set(self, name, value)
        defaults = cls._defaults
        missing = []
        for name in names[len(args):]:
            if name in kwargs:
                value = kwargs.pop(name)
            elif name in defaults:
                value = defaults[name]
                if type(value) is Factory:
                    value = value.make()
            else:
                missing.append(name)
                continue
            _set(self, name, value)
        if kwargs:  # a name already given by position, or no field at all
            name = next(iter(kwargs))
            if name in names:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
        if missing:
            raise TypeError(f"{cls.__name__}() missing {len(missing)} required argument(s): "
                            + ", ".join(repr(m) for m in missing))

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r}: a {type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"cannot delete field {name!r}: a {type(self).__name__} is immutable")

    def _values(self) -> tuple:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # most hold dicts; a subclass of hashable values defines its own

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields) + ")"

    def __reduce__(self):
        return (type(self), self._values())

    def replace(self, **changes):
        """A copy with `changes` (as dataclasses.replace); an unknown field is a TypeError."""
        names = self._fields
        unknown = [name for name in changes if name not in names]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(sorted(unknown))}")
        for name in names:
            if name not in changes:
                changes[name] = getattr(self, name)
        return type(self)(**changes)


def field_names(record) -> tuple[str, ...]:
    """The fields of a Record class or instance, in order (dataclasses.fields, names only)."""
    return record._fields


def hash_by_value(record) -> int:
    """`__hash__ = hash_by_value` in a Record of hashable values: what a frozen dataclass gave."""
    return hash(record._values())
