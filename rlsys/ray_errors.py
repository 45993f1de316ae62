"""What a call on a Ray actor raises when the actor is gone.

An actor that crashes or is killed raises `RayActorError` (`ActorDiedError`) from every call
on it. One that Ray's memory monitor kills when the node runs short of memory raises
`OutOfMemoryError` instead, which is not a `RayActorError`: without it in this tuple a run that
lost an engine to the monitor crashed at the next ping rather than replacing the engine, and a
learner killed this way was not restarted from its checkpoint.
"""

from __future__ import annotations

from ray.exceptions import OutOfMemoryError, RayActorError

ACTOR_LOST: tuple[type[Exception], ...] = (RayActorError, OutOfMemoryError)
