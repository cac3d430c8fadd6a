"""Where a checkpoint's bytes go, and how a save becomes a committed checkpoint.

What the bytes mean is :mod:`zdcp.format`'s business; these modules move them:

- :mod:`~zdcp.storage.store`: a checkpoint's tensorstore key-value store, its JSON documents,
  and storage failures as :class:`~zdcp.StorageError`;
- :mod:`~zdcp.storage.localfiles`: plain chunk files in a local directory, written and read
  without tensorstore's per-file overhead;
- :mod:`~zdcp.storage.inflight`: a window of chunk I/O in flight, bounded in bytes;
- :mod:`~zdcp.storage.commit`: the commit protocol of a save (a pending sibling directory
  renamed into place, or an object-store prefix committed by its root document);
- :mod:`~zdcp.storage.committed`: the read side of that protocol: a location's committed
  catalog, or why there is none;
- :mod:`~zdcp.storage.oscalls`: the Linux calls Python does not wrap (``syncfs``,
  ``sync_file_range``, ``renameat2``).
"""
