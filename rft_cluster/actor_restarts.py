"""Ray options that make a stateless service actor (tool proxy, grader) survive its process.

Ray's semantics with these options: when the actor's process dies (SIGKILL, OOM, node lost),
Ray re-creates it with the same constructor arguments, up to `max_restarts` times; every task
that was in flight on it, or submitted while it restarts, is re-sent to the new instance
(`max_task_retries=-1`: as often as restarts allow) and the caller's `await` just takes longer.
That is at-least-once: a call the old process had already sent to an endpoint is sent again
(the same call_id and trace_id, a fresh request `id`). Once restarts are exhausted, callers get
`ray.exceptions.ActorDiedError`. Exceptions the method itself raises are never retried.
"""

from __future__ import annotations

from typing import Any


def restartable(max_restarts: int) -> dict[str, Any]:
    """Options for `ray.remote(cls).options(**restartable(cluster.actor_max_restarts), ...)`."""
    if max_restarts < 0:
        raise ValueError(f"cluster.actor_max_restarts must be >= 0, got {max_restarts}")
    # With no restarts, a retry would only find the actor dead: fail the call at once.
    return {"max_restarts": max_restarts, "max_task_retries": -1 if max_restarts else 0}
