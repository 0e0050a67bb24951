"""The rollout stream: finished trajectory groups between rollout workers and trainers, in a Ray
actor (default) or durable on Redis Streams. Not yet used by the RL controller."""

from raylane.streaming.base import Receipt, RolloutStream, StreamEntry
from raylane.streaming.config import StreamConfig, open_rollout_stream
from raylane.streaming.memory import InMemoryRolloutStream
from raylane.streaming.redis_stream import RedisRolloutStream

__all__ = [
    "InMemoryRolloutStream",
    "Receipt",
    "RedisRolloutStream",
    "RolloutStream",
    "StreamConfig",
    "StreamEntry",
    "open_rollout_stream",
]
