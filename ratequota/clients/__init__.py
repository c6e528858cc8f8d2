"""The clients: one sans-I/O core and the thin shells that perform its operations.

``core`` and ``router`` (with ``explain`` and ``failure``) hold every decision a
client makes, as flows that yield the ops of ``ratequota.engine.ops``;
``settings`` and ``requests`` validate before any I/O; ``runner`` steps a flow;
``shell`` holds what both clients share; ``sync`` and ``aio`` are the blocking
and asyncio clients; ``backends`` owns connections; ``renewal`` and
``readiness`` are the background renewer and the readiness probe. The package
facade (``ratequota``) re-exports the public names.
"""
