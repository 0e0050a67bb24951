"""Publish new policy weights to every replica of a running serving application.

A Serve handle routes each call to *one* replica, so a broadcast cannot go through handles.
Instead each served model has a `WeightStore`: a named, detached Ray actor holding a reference
to the latest published version (the tensors live in the object store, owned by the store so
they outlive the publisher). Every `LLMServer` replica long-polls its store and applies a newer version
through its engine between two steps, so in-flight requests carry on under the new weights;
a replica started later (autoscaling, restart) loads the latest version before it serves.
`publish_weights` is what an RL controller calls after each policy update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import ray
from pydantic import Field

from raylane.config import StrictConfig
from raylane.serving.config import deployment_name_for

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STORE_NAMESPACE = "raylane-serving"


@ray.remote(num_cpus=0)
class WeightStore:
    """The latest published weights of one served model, and which replicas have applied them."""

    def __init__(self) -> None:
        self._version: int | None = None
        # Wrapped in a list so Ray hands the reference itself to callers, not the tensors.
        self._ref: list[ray.ObjectRef] = []
        self._published = asyncio.Condition()
        self._applied: dict[str, int] = {}

    async def publish(self, version: int, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        if self._version is not None and version <= self._version:
            raise ValueError(
                f"weight version {version} is not newer than the published version {self._version}"
            )
        # `ray.put` from this actor makes the store the owner of the weights object.
        self._ref = [ray.put(named_tensors)]
        self._version = version
        async with self._published:
            self._published.notify_all()

    async def latest(self) -> tuple[int, list[ray.ObjectRef]] | None:
        return self._latest()

    async def wait_newer(self, version: int, timeout_s: float) -> tuple[int, list[ray.ObjectRef]] | None:
        """The latest version once it is newer than ``version``; None if none arrives in ``timeout_s``."""
        async with self._published:
            try:
                await asyncio.wait_for(
                    self._published.wait_for(lambda: self._version is not None and self._version > version),
                    timeout_s,
                )
            except TimeoutError:
                return None
        return self._latest()

    def _latest(self) -> tuple[int, list[ray.ObjectRef]] | None:
        return None if self._version is None else (self._version, self._ref)

    async def report_applied(self, replica_id: str, version: int) -> None:
        self._applied[replica_id] = version

    async def num_applied(self, version: int) -> int:
        """How many replicas report serving ``version`` or newer."""
        return sum(v >= version for v in self._applied.values())


def store_name(app_name: str, model_name: str) -> str:
    return f"weights:{app_name}:{model_name}"


def get_weight_store(app_name: str, model_name: str) -> Any:
    """The weight store of a served model, created on first use (detached: it outlives its creator)."""
    return WeightStore.options(
        name=store_name(app_name, model_name),
        namespace=STORE_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote()


def delete_weight_store(app_name: str, model_name: str) -> None:
    """Kill a served model's weight store (after its application is deleted); no-op if there is none."""
    try:
        store = ray.get_actor(store_name(app_name, model_name), namespace=STORE_NAMESPACE)
    except ValueError:
        return
    ray.kill(store)


def _num_running_replicas(app_name: str, deployment_name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment_name not in app.deployments:
        raise ValueError(
            f"no serving application {app_name!r} with deployment {deployment_name!r} is running"
        )
    return app.deployments[deployment_name].replica_states.get("RUNNING", 0)


def publish_weights(
    app_name: str,
    model_name: str,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    wait: bool = True,
    timeout_s: float = 300.0,
) -> None:
    """Publish ``version`` of a served model's weights (Hugging Face parameter names) to all its replicas.

    Each replica applies it between two engine steps; requests in flight continue under the new
    weights. With ``wait`` this returns once every running replica serves ``version`` and raises
    `TimeoutError` after ``timeout_s``. Versions must increase.
    """
    tensors = [(name, tensor.detach().cpu()) for name, tensor in named_tensors]
    store = get_weight_store(app_name, model_name)
    ray.get(store.publish.remote(version, tensors))
    logger.info(
        "published weight version %d of %s/%s (%d tensors)", version, app_name, model_name, len(tensors)
    )
    if not wait:
        return
    deployment = deployment_name_for(model_name)
    deadline = time.monotonic() + timeout_s
    while True:
        applied = ray.get(store.num_applied.remote(version))
        running = _num_running_replicas(app_name, deployment)
        if running and applied >= running:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{applied} of {running} replicas of {app_name}/{model_name} applied weight version {version} "
                f"within {timeout_s} s; check the replicas' logs"
            )
        time.sleep(0.05)


class WeightPublishConfig(StrictConfig):
    """The config switch of an RL job that serves its policy: which served model gets each new version.

    Embed it as an optional field of a job config (None: do not publish) and call `publish` after
    each policy update.
    """

    app_name: str = Field(min_length=1, description="the serving application (`raylane serve --app-name`)")
    model: str = Field(min_length=1, description="the served model name to update")
    wait: bool = Field(True, description="block until every replica serves the new version")
    timeout_s: float = Field(300.0, gt=0)

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        publish_weights(
            self.app_name, self.model, named_tensors, version, wait=self.wait, timeout_s=self.timeout_s
        )


class WeightFollower:
    """Runs in a replica: applies every newly published version through ``apply`` and reports it."""

    def __init__(self, app_name: str, model_name: str, replica_id: str) -> None:
        self.app_name = app_name
        self.model_name = model_name
        self.replica_id = replica_id
        self._store = get_weight_store(app_name, model_name)

    async def latest(self) -> tuple[int, list[tuple[str, torch.Tensor]]] | None:
        """The latest published version and its tensors, if any was published."""
        latest = await self._store.latest.remote()
        if latest is None:
            return None
        version, (ref,) = latest
        return version, await ref

    async def report(self, version: int) -> None:
        await self._store.report_applied.remote(self.replica_id, version)

    async def follow(
        self,
        current_version: Callable[[], int],
        apply: Callable[[list[tuple[str, torch.Tensor]], int], Awaitable[Any]],
        poll_timeout_s: float = 30.0,
    ) -> None:
        """Forever: wait for a version newer than ``current_version()`` and ``await apply(tensors, version)``."""
        while True:
            try:
                update = await self._store.wait_newer.remote(current_version(), poll_timeout_s)
                if update is None:
                    continue
                version, (ref,) = update
                await apply(await ref, version)
                await self.report(version)
            except Exception:
                # A lost store (killed, node died) or a bad publish must not kill the replica: retry.
                logger.exception(
                    "following weight versions of %s/%s failed; retrying", self.app_name, self.model_name
                )
                await asyncio.sleep(1.0)
                self._store = get_weight_store(self.app_name, self.model_name)
