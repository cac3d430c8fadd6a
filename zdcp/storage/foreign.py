"""Foreign files: entries at the top of a checkpoint's directory that the checkpoint does not use.

Frameworks put files of their own beside the DCP data, in the same directory: Lightning writes
``meta.pt`` into the checkpoint directory after the save. zdcp leaves them alone (docs/format.md,
section 5):

- a load, an open and ``zdcp.verify`` never read them; verify lists them, as ignored;
- a local save whose commit replaces the directory (a checkpoint there, or only foreign files)
  hard-links them into its pending directory before the swap, so that the directory that takes
  the target's place holds them too, and a crash at any moment leaves each at the target;
- a local removal swaps the checkpoint for a directory of the same links: what it deletes is
  the checkpoint alone.

Where hard links are impossible (a filesystem without them), a save or removal that would have
to carry foreign files refuses before it writes anything. A DCP checkpoint's own files
(``.metadata``, ``*.distcp``) are no foreign files: they are a checkpoint, which a save with
``overwrite`` replaces.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ..errors import CheckpointExistsError, StorageError
from ..format.catalog import Catalog
from ..format.constants import SAVING_MARKER, ZARR_JSON
from .contents import COMMITTED, dcp_files, root_document
from .layout import Layout, layouts
from .location import Location

__all__ = [
    "top_level_nodes",
    "foreign_names",
    "foreign_entries",
    "zarr_remains",
    "check_links",
    "link_entries",
]

#: The name under which a save tries a hard link before it writes anything.
_LINK_PROBE = ".zdcp-link-probe"


def top_level_nodes(catalog: Catalog) -> set[str]:
    """The names of the nodes directly under a checkpoint's root group."""
    return {node.partition("/")[0] for node in catalog.documents}


def foreign_names(names: Iterable[str], layout: Layout, catalog: Catalog) -> list[str]:
    """Those of ``names``, entries at the top of a checkpoint's location, that the committed
    checkpoint (``layout``, ``catalog``) does not use, sorted."""
    nodes = top_level_nodes(catalog)
    return sorted(n for n in set(names) if n != SAVING_MARKER and not layout.owns(n, nodes))


def foreign_entries(directory: str, kind: str) -> list[str]:
    """The foreign entries of a local ``directory`` that holds ``kind``
    (:func:`~zdcp.storage.contents.local_contents`), sorted: every entry but a saving marker,
    a DCP checkpoint's files, and, with a committed zdcp checkpoint there, what it uses.
    Raises :class:`~zdcp.StorageError` where the directory cannot be read."""
    with _access(directory):
        names = [n for n in os.listdir(directory) if n != SAVING_MARKER]
        names = [n for n in names if n not in dcp_files(directory, names)]
    if kind != COMMITTED:
        return sorted(names)
    # Names that some layout writes whatever the nodes are no foreign files: where nothing
    # else is there (a checkpoint alone, packed), the checkpoint need not be read again.
    left = [n for n in names if not any(layout.owns(n, ()) for layout in layouts())]
    if not left:
        return []
    hierarchy, root = root_document(Location(directory))
    if root is None:  # gone since the caller looked: nothing of a checkpoint is foreign then
        return sorted(names)
    layout = hierarchy.layout
    if not layout.nodes_are_entries:
        return sorted(n for n in names if not layout.owns(n, ()))
    return foreign_names(left, layout, Catalog.parse(root, hierarchy.url))


def zarr_remains(directory: str, names: Iterable[str]) -> list[str]:
    """Those of ``names`` (entries of a local ``directory`` that holds no committed
    checkpoint) that look like part of a Zarr hierarchy: a name a layout writes whatever the
    nodes (``zarr.json``, a database's files), or a directory holding a ``zarr.json`` (a node).
    Such a directory holds the remains of a checkpoint, not foreign files."""
    return [
        n
        for n in names
        if any(layout.owns(n, ()) for layout in layouts()) or os.path.isfile(os.path.join(directory, n, ZARR_JSON))
    ]


def check_links(source: str, names: Iterable[str], directory: str) -> None:
    """Raise :class:`~zdcp.StorageError` unless the entries ``names`` of ``source`` can be
    carried over into ``directory`` (:func:`link_entries`): files, directories and symbolic
    links only, all on the filesystem of ``directory``, every file one this process may link
    (Linux's ``protected_hardlinks``: its own, or one it may read and write), and a file
    linked there indeed."""
    names = list(names)
    with _access(source):
        device = os.stat(directory).st_dev
        paths = [path for name in names for path in _walk(os.path.join(source, name))]
        regular = []
        for path in paths:
            status = os.lstat(path)
            if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode) or stat.S_ISLNK(status.st_mode)):
                raise _cannot_link(source, names, OSError(errno.EPERM, "not a file, directory or symbolic link", path))
            if status.st_dev != device:
                raise _cannot_link(source, names, OSError(errno.EXDEV, "on another filesystem", path))
            if stat.S_ISREG(status.st_mode):
                if status.st_uid != os.geteuid() and os.geteuid() != 0 and not os.access(path, os.R_OK | os.W_OK):
                    raise _cannot_link(source, names, OSError(errno.EPERM, "another user's file", path))
                regular.append(path)
    if regular:
        probe = os.path.join(directory, _LINK_PROBE)
        try:
            os.link(regular[0], probe)
        except OSError as e:
            raise _cannot_link(source, names, e) from e
        os.unlink(probe)


def link_entries(source: str, names: Iterable[str], destination: str) -> None:
    """Hard-link the entries ``names`` of the local directory ``source`` into ``destination``
    under the same names: directories are made anew and their files linked, symbolic links are
    copied as links. Raises :class:`~zdcp.CheckpointExistsError` where ``destination`` has an
    entry of the same name, :class:`~zdcp.StorageError` where a link cannot be made."""
    names = list(names)
    for name in names:
        if os.path.lexists(os.path.join(destination, name)):
            raise CheckpointExistsError(
                f"{os.path.join(source, name)} is not part of the checkpoint, but the checkpoint saved there "
                f"has an entry of that name; move it away first"
            )
        try:
            _link(os.path.join(source, name), os.path.join(destination, name))
        except OSError as e:
            raise _cannot_link(source, names, e) from e


def _link(source: str, destination: str) -> None:
    mode = os.lstat(source).st_mode
    if stat.S_ISDIR(mode):
        os.mkdir(destination)
        for name in os.listdir(source):
            _link(os.path.join(source, name), os.path.join(destination, name))
        shutil.copystat(source, destination, follow_symlinks=False)  # its mode and times (not its owner)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), destination)
    elif stat.S_ISREG(mode):
        os.link(source, destination)
    else:
        raise OSError(errno.EPERM, "not a file, directory or symbolic link", source)


def _walk(path: str) -> list[str]:
    """``path`` and, for a directory (not a link to one), every path below it."""
    if os.path.islink(path) or not os.path.isdir(path):
        return [path]
    return [path, *(p for name in sorted(os.listdir(path)) for p in _walk(os.path.join(path, name)))]


@contextmanager
def _access(directory: str) -> Iterator[None]:
    """Failures to read ``directory`` (permissions, an entry gone meanwhile), as
    :class:`~zdcp.StorageError` naming it."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"cannot read {directory}: {e}") from e


def _cannot_link(directory: str, names: Iterable[str], error: OSError) -> StorageError:
    return StorageError(
        f"{directory} holds files that are not part of the checkpoint ({', '.join(sorted(names))}); zdcp keeps "
        f"them by hard-linking them into the directory that replaces it, and that failed: {error}. Move them "
        f"away, or save to another directory"
    )
