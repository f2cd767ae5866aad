"""The names every role looks Hyperfleet's Ray actors up by.

The API (``serve_app``) starts the control store; the agent replicas (``actors``) meter their turns
into it and batch jobs find replicas by name; the CLI starts the stack. Each names the actors the
same way, from here.
"""

from __future__ import annotations

NAMESPACE = "hyperfleet"  # the Ray namespace of every detached, named Hyperfleet actor
CONTROL_ACTOR_NAME = "control-store"  # the API's control store, where replicas meter turns
POOL_ACTOR_NAME = "pool-controller"  # scales every agent's replicas (``autoscaling/pool.py``)
