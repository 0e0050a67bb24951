"""The rollout stream's config section and the function that opens the configured backend."""

from __future__ import annotations

from pydantic import Field

from raylane.config import StrictConfig
from raylane.streaming.base import RolloutStream
from raylane.streaming.memory import InMemoryRolloutStream
from raylane.streaming.redis_stream import RedisRolloutStream


class StreamConfig(StrictConfig):
    """Where finished trajectory groups wait for the trainers."""

    redis_url: str | None = Field(
        default=None, description="redis://host:port/db for the durable backend; unset: a Ray actor"
    )
    stream_key: str = Field(default="raylane:rollouts", min_length=1)
    consumer_group: str = Field(default="trainers", min_length=1, description="Redis only")
    claim_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="a held entry idle this long is taken over by another trainer (each looks, and renews "
        "what it holds, in a get at least claim_idle_s / 4 after its last look); keep it above 4/3 of the "
        "longest time a live trainer goes without calling get",
    )
    reconnect_s: float = Field(
        30.0, gt=0, description="Redis only: how long a lost connection is retried before the job stops"
    )


def open_rollout_stream(config: StreamConfig, consumer: str) -> RolloutStream:
    """A handle on the configured stream, consuming as ``consumer``."""
    if config.redis_url:
        return RedisRolloutStream(
            config.redis_url,
            consumer,
            stream_key=config.stream_key,
            consumer_group=config.consumer_group,
            claim_idle_s=config.claim_idle_s,
            reconnect_s=config.reconnect_s,
        )
    return InMemoryRolloutStream(consumer, stream_key=config.stream_key, claim_idle_s=config.claim_idle_s)
