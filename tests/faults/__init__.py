"""A fault harness: pod processes under injected faults, and an independent history checker.

``pod`` is one worker process (sync or async client) recording every call it
makes; ``driver`` starts real redis-server processes and pods, injects faults
on a seeded schedule and takes snapshots; ``checker`` reads the histories
alone (it never imports ratequota) and reports every violated property;
``profiles`` names what a run does. ``python -m tests.faults.driver --help``
runs one by hand.
"""
