"""The clients: one sans-I/O core and the thin shells that perform its operations.

``core`` (with ``explain`` and ``failure``) holds every decision a client makes,
as flows that yield operations; ``shell`` runs a flow; ``sync`` and ``aio`` are
the blocking and asyncio clients; ``backends`` owns connections; ``renewal``
and ``readiness`` are the background renewer and the readiness probe. The
package facade (``ratequota``) re-exports the public names.
"""
