"""The engine: everything that decides what goes over the wire, with no I/O.

``keys`` names a group's Redis keys, ``routing`` picks the shard, ``scripts``
reads the Lua files and their headers, ``ops`` holds every op a flow yields,
``protocol`` encodes script arguments, ``replies`` decodes replies into named
types, ``coalesce`` merges concurrent calls of one group, ``batching`` says
when the async client sends. Nothing here imports a client; the clients
import this.
"""
