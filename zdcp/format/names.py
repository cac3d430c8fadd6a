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
out of percent-encoding, so decoding is unambiguous.

A *node* name (a directory or object-key segment, unlike an attribute name) longer than
:data:`MAX_NAME_BYTES` is shortened to a readable prefix, ``"%h"`` and a hash of the whole name;
the parent group records the whole name (its ``long_names``), which a reader checks against the
hash. docs/format.md, section 2, states the same rules.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote, unquote

from ..errors import UnsafeError, UnsupportedValueError

__all__ = [
    "Key",
    "encode_key",
    "decode_key",
    "node_name",
    "shortened",
    "decode_node_name",
    "MAX_NAME_BYTES",
    "join",
    "describe",
    "dotted",
    "Entry",
    "DICT",
    "LIST",
]

Key = str | int
#: What a key indexes: a dict (a group) or a list that holds tensors (a ``"list"`` group).
DICT, LIST = "dict", "list"

# Escaped wherever they occur. quote() never escapes letters, digits and "_.-~".
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%/\\")
# Escaped in their first character only, since they mean something to Zarr or to zdcp.
_RESERVED_NAMES = {".", "..", "zarr.json", "zdcp"}
# A non-empty key of safe characters only, which most keys are, is its own name unless reserved.
_VERBATIM = re.compile(f"[{re.escape(_SAFE)}]+")


def _verbatim(text: str) -> bool:
    """Whether ``text`` is a key that is its own name (and so a name that is its own key)."""
    return _VERBATIM.fullmatch(text) is not None and text not in _RESERVED_NAMES and not text.startswith("__")


def encode_key(key: Key, where: str = "") -> str:
    """The Zarr node name for one state-dict key (``where``: its parent, for the error)."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        inside = f" in {where!r}" if where else ""
        raise UnsupportedValueError(
            f"state-dict key {key!r}{inside} has type {type(key).__name__}; zdcp stores str and int keys"
        )
    if isinstance(key, int):
        return f"%i{key}"
    if _verbatim(key):
        return key
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
    if _verbatim(name):
        return name
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


#: Node names longer than this are shortened: filesystems allow 255 bytes per name, some
#: (encrypted ones) fewer. Encoded names are ASCII, so characters and bytes count alike.
MAX_NAME_BYTES = 128
#: How much of a long name a shortened one keeps, and how many hex digits of its SHA-256 follow.
_PREFIX_LENGTH = 64
_HASH_DIGITS = 32
#: Separates a shortened name's prefix from its hash; never part of an encoded name, whose "%"
#: is always followed by two upper-case hex digits, "i" or "e".
_HASHED = "%h"


def node_name(key: Key, where: str = "") -> str:
    """The name of the node (group or array) that holds ``key``: its encoded name, shortened
    when longer than :data:`MAX_NAME_BYTES`."""
    name = encode_key(key, where)
    return name if len(name) <= MAX_NAME_BYTES else shortened(name)


def shortened(name: str) -> str:
    """The short form of a long encoded name: its first 64 characters (fewer where that would
    cut a percent escape in two), ``"%h"``, and the first 32 hex digits of its SHA-256."""
    prefix = name[:_PREFIX_LENGTH]
    escape = prefix.find("%", len(prefix) - 2)
    if escape != -1:
        prefix = prefix[:escape]
    return f"{prefix}{_HASHED}{hashlib.sha256(name.encode()).hexdigest()[:_HASH_DIGITS]}"


def decode_node_name(name: str, long_names: Mapping[str, str]) -> tuple[Key, str]:
    """The key of a node named ``name`` in a group whose recorded ``long_names`` map short
    names to whole ones, and the key's whole encoded name. A short name must be recorded and be
    exactly what :func:`shortened` makes of its whole name, which must itself be a canonical
    long name."""
    if _HASHED not in name:
        return decode_key(name), name
    whole = long_names.get(name)
    if not isinstance(whole, str) or len(whole) <= MAX_NAME_BYTES or shortened(whole) != name:
        raise UnsafeError(f"{name!r} is not a shortened node name of this group; refusing to use it as a path")
    return decode_key(whole), whole


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
    def fqn(self) -> str:
        """The leaf's FQN in zdcp's planners: its keys encoded and joined with ``"/"``, unique
        and reversible (``"app/model/net1.weight"``)."""
        return join([encode_key(k) for k in self.path])

    @cached_property
    def node(self) -> str:
        """The leaf's Zarr node path, where a save puts it: its FQN with long names shortened."""
        return join([node_name(k) for k in self.path])

    @property
    def dcp_fqn(self) -> str:
        """The FQN that DCP's own planners give this leaf."""
        return dotted(self.path)
