"""The rollout stream: finished trajectory groups between rollout workers and trainers, in a Ray
actor (default) or durable on Redis Streams; the asynchronous RL controller's data path."""

from raylane.streaming.base import Receipt, RolloutStream, StreamEntry
from raylane.streaming.config import StreamConfig, open_rollout_stream
from raylane.streaming.memory import InMemoryRolloutStream
from raylane.streaming.redis_stream import RedisRolloutStream, StreamUnavailableError

__all__ = [
    "InMemoryRolloutStream",
    "Receipt",
    "RedisRolloutStream",
    "RolloutStream",
    "StreamConfig",
    "StreamEntry",
    "StreamUnavailableError",
    "open_rollout_stream",
]
