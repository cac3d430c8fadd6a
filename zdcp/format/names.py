"""State-dict keys <-> Zarr node names.

A state-dict key becomes the name of a Zarr node (array or group) or of a group attribute. Most
keys (``"net1.weight"``, ``"exp_avg"``) are valid names and are kept verbatim, so the hierarchy
reads like the state dict. The rest get a reversible encoding, so that every key round-trips and
no key can name a path outside its parent (``"/"``, ``"."``, ``".."``) or collide with the
format's own files:

* ``int`` keys -> ``"%i<decimal>"`` (``0`` -> ``"%i0"``, ``-3`` -> ``"%i-3"``);
* the empty string -> ``"%e"``;
* any other string is percent-encoded where needed: ``"%"``, ``"/"``, control characters and
  backslash always; the first character of a key that starts with ``"__"`` (reserved by Zarr), of
  ``"."``/``".."``, of ``"zarr.json"`` and of ``"zdcp"`` (zdcp's attribute key).

Percent escapes use two upper-case hex digits per UTF-8 byte; ``"%i"`` and ``"%e"`` cannot come
out of percent-encoding, so decoding is unambiguous. docs/format.md states the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote, unquote

from ..errors import UnsafeError, UnsupportedValueError

__all__ = ["Key", "encode_key", "decode_key", "join", "describe", "dotted", "Entry", "DICT", "LIST"]

Key = str | int
#: What a key indexes: a dict (a group) or a list that holds tensors (a ``"list"`` group).
DICT, LIST = "dict", "list"

# Escaped wherever they occur. quote() never escapes letters, digits and "_.-~".
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%/\\")
# Escaped in their first character only, since they mean something to Zarr or to zdcp.
_RESERVED_NAMES = {".", "..", "zarr.json", "zdcp"}


def encode_key(key: Key, where: str = "") -> str:
    """The Zarr node name for one state-dict key (``where``: its parent, for the error)."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        inside = f" in {where!r}" if where else ""
        raise UnsupportedValueError(
            f"state-dict key {key!r}{inside} has type {type(key).__name__}; zdcp stores str and int keys"
        )
    if isinstance(key, int):
        return f"%i{key}"
    if key == "":
        return "%e"
    try:
        name = quote(key, safe=_SAFE)
    except UnicodeEncodeError:
        inside = f" in {where!r}" if where else ""
        raise UnsupportedValueError(f"state-dict key {key!r}{inside} is not valid Unicode text") from None
    if name in _RESERVED_NAMES or name.startswith("__"):
        name = f"%{ord(name[0]):02X}{name[1:]}"
    return name


def decode_key(name: str) -> Key:
    """The state-dict key that :func:`encode_key` turned into ``name``.

    Only names in the exact form :func:`encode_key` produces are accepted, so a crafted
    checkpoint cannot smuggle ``".."`` or ``"a/b"`` into a path through an odd spelling.
    """
    key: Key | None
    try:
        if name.startswith("%i"):
            key = int(name[2:])
        elif name == "%e":
            key = ""
        else:
            key = unquote(name, errors="strict")
    except ValueError:  # not an integer, or not UTF-8
        key = None
    if key is None or encode_key(key) != name:
        raise UnsafeError(f"{name!r} is not a node name zdcp writes; refusing to use it as a path")
    return key


def join(names: list[str] | tuple[str, ...]) -> str:
    """A node path ("app/model/net1.weight") from encoded names; the root is ``""``."""
    return "/".join(names)


def describe(path: tuple[Key, ...]) -> str:
    """A key path as users write it, for error messages: ``app/optim/state/0/exp_avg``."""
    return "/".join(str(k) for k in path) or "<root>"


def dotted(path: tuple[Key, ...]) -> str:
    """A key path as DCP's dotted FQN (``app.model.net1.weight``); also safetensors' names."""
    return ".".join(map(str, path))


@dataclass(frozen=True)
class Entry:
    """Where one leaf of a state dict lives.

    ``path`` holds the keys from the root to the leaf; ``kinds[i]`` says whether ``path[i]``
    indexes a ``"dict"`` or a ``"list"``.
    """

    path: tuple[Key, ...]
    kinds: tuple[str, ...]

    @classmethod
    def from_dcp_path(cls, path: tuple[Key, ...]) -> Entry:
        """DCP's key paths hold str dict keys and int list indices."""
        return cls(tuple(path), tuple(LIST if isinstance(k, int) else DICT for k in path))

    @cached_property
    def node(self) -> str:
        """The leaf's Zarr node path."""
        return join([encode_key(k) for k in self.path])

    @property
    def dcp_fqn(self) -> str:
        """The FQN that DCP's own planners give this leaf."""
        return dotted(self.path)
