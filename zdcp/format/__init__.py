"""The zdcp checkpoint format: everything that decides what a checkpoint holds, in one place.

docs/format.md is the normative description; these modules are its implementation, shared by
every writer and reader (the storage code in :mod:`zdcp.storage` only moves the bytes):

- :mod:`~zdcp.format.constants`: the format's name, version, reserved keys and sizes;
- :mod:`~zdcp.format.names`: state-dict keys <-> Zarr node names (section 2);
- :mod:`~zdcp.format.dtypes`: torch <-> Zarr ``data_type`` <-> numpy (section 3);
- :mod:`~zdcp.format.codecs`: the codec chains zdcp writes, and recognising the plain ones (section 3);
- :mod:`~zdcp.format.documents`: chunk grids, chunk keys and the ``zarr.json`` documents (sections 3-5);
- :mod:`~zdcp.format.values`: plain values <-> JSON attributes (section 6);
- :mod:`~zdcp.format.catalog`: parsing and validating a committed root document (section 8).
"""
