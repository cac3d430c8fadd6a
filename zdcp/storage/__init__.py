"""Where a checkpoint's bytes go, and how a save becomes a committed checkpoint.

What the bytes mean is :mod:`zdcp.format`'s business; these modules move them:

- :mod:`~zdcp.storage.location`: a ``checkpoint_id`` parsed into a :class:`Location`, the place
  (a local directory, an object-store prefix) and its tensorstore context;
- :mod:`~zdcp.storage.keyvalue`: a tensorstore key-value store as zdcp uses one (the base of a
  location and of a hierarchy), and JSON documents in it;
- :mod:`~zdcp.storage.hierarchy`: a checkpoint's Zarr hierarchy as its layout stores it, and
  its arrays opened through tensorstore;
- :mod:`~zdcp.storage.layout`: the :class:`Layout` strategy and its registry, and the chunk
  sink each rank of a save writes through;
- :mod:`~zdcp.storage.files` and :mod:`~zdcp.storage.packed`: the two layouts (one file per
  chunk and document; an OCDBT database);
- :mod:`~zdcp.storage.localfiles`: plain chunk files in a local directory, written and read
  without tensorstore's per-file overhead;
- :mod:`~zdcp.storage.inflight`: a window of chunk I/O in flight, bounded in bytes;
- :mod:`~zdcp.storage.saving`: the commit protocol of a save (a pending sibling directory
  renamed into place, or an object-store prefix committed by its root document);
- :mod:`~zdcp.storage.contents`: what a location holds: its committed checkpoint, or why
  there is none;
- :mod:`~zdcp.storage.removal`: removing a committed checkpoint, and what interrupted saves left;
- :mod:`~zdcp.storage.steps`: a directory of checkpoints, one per step, and which are committed;
- :mod:`~zdcp.storage.failures`: failed requests as :class:`~zdcp.StorageError`, bad data as
  :class:`~zdcp.CorruptCheckpointError`;
- :mod:`~zdcp.storage.oscalls`: the Linux calls Python does not wrap (``syncfs``,
  ``sync_file_range``, ``renameat2``) and whether a process still runs.

Outside this package nothing names a layout: a new one is a module here and an entry in
:mod:`zdcp.storage.layout`'s registry.
"""
