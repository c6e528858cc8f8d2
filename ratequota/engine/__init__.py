"""The engine: everything that decides what goes over the wire, with no I/O.

``keys`` names a group's Redis keys, ``routing`` picks the shard, ``scripts``
reads the Lua files and their headers, ``protocol`` encodes script arguments
and decodes replies into named types, ``batching`` merges concurrent calls of
one group. Nothing here imports a client; the clients import this.
"""
