"""The client core: everything a Fleet client decides, with no I/O (the httpx pattern).

``FleetClient`` (producer/client.py) and ``AsyncFleetClient`` (producer/async_client.py) hold only
their I/O and share these modules:

| module | decides |
|---|---|
| ``requests`` | turning a submit call's arguments into a validated contract request |
| ``options`` | the submission options (priority, deadline, idempotency key, ...) and their validation |
| ``jobs`` | job ids (the client's prefix), the job record, the idempotency fingerprint, message headers |
| ``catalog`` | which queue a model's jobs go to, and whether a live worker serves it |
| ``depth`` | the queue-depth estimate behind backpressure |
| ``results`` | reading stored results: state, ``JobStatus`` (``EXPIRED`` included), typed outcome |
| ``router`` | the one result subscription: who waits for what, results that arrive early |
| ``waits`` | waiting for many jobs, and following a token stream, as state machines |

Publishing, which both clients do the same way (synchronously: kombu has no asyncio API), is
``producer/publishing.py``.
"""
