"""An application of one model serves it from one deployment: the ingress runs in the model's replica.

One application for the module, deployed with the default ``ingress: auto``, an API key and gRPC
on; its answers are checked against offline generation on both protocols, streamed and not.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable

import grpc
import openai
import pytest
from ray import serve

from raylane.models import make_tiny_model
from raylane.runner import LLM, SamplingParams
from raylane.serving import LLMClient, ServingConfig, deploy, deployment_name_for, undeploy
from raylane.serving.proto import llm_pb2
from tests.conftest import free_port

APP = "test-one-deployment"
API_KEY = "key-of-the-one-deployment-app"
MAX_MODEL_LEN = 4096
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "seed": 11}


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory, monkeypatch_module):
    model = make_tiny_model(
        str(tmp_path_factory.mktemp("one") / "m"), std=0.3, max_position_embeddings=MAX_MODEL_LEN
    )
    monkeypatch_module.setenv("RAYLANE_API_KEY", API_KEY)
    config = ServingConfig(
        app_name=APP,
        models=[{"name": "tiny", "engine": {"model": model, "max_model_len": MAX_MODEL_LEN}}],
        port=free_port(),
        grpc_port=free_port(),
    )
    deploy(config)
    try:
        yield config, LLM(model, max_model_len=MAX_MODEL_LEN)
    finally:
        undeploy(config)
        serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _expected(offline: LLM, prompt: str, **sampling) -> str:
    return offline.generate([prompt], SamplingParams(**sampling), use_tqdm=False)[0].outputs[0]


def test_one_model_is_one_deployment_that_answers_both_protocols(served):
    config, offline = served
    assert set(serve.status().applications[APP].deployments) == {deployment_name_for("tiny")}

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{config.port}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = _expected(offline, "one hop", max_tokens=12, **SAMPLING)
    got = client.completions.create(model="tiny", prompt="one hop", max_tokens=12, **SAMPLING)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="one hop",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **SAMPLING,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 12
    messages = [{"role": "user", "content": "Hello there"}]
    chat = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True, **SAMPLING)
    )
    assert chat[0].choices[0].delta.role == "assistant"
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **SAMPLING)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{config.port}/v1", api_key="wrong", max_retries=0
        ).completions.create(model="tiny", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)

    with LLMClient(f"127.0.0.1:{config.grpc_port}", application=APP, api_key=API_KEY) as grpc_client:
        assert grpc_client.health().status == llm_pb2.HealthResponse.SERVING
        messages = list(grpc_client.generate_stream("one hop", model="tiny", max_tokens=12, **SAMPLING))
        assert "".join(d.text for m in messages for d in m.deltas) == want.text
        assert messages[-1].usage.completion_tokens == 12
        unary = grpc_client.generate("one hop", max_tokens=12, **SAMPLING)  # the only model: no name needed
        assert unary.completions[0].text == want.text
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.generate("one hop", model="tiny", top_p=3.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _engine_stats() -> dict:
    return serve.get_deployment_handle(deployment_name_for("tiny"), APP).engine_stats.remote().result()


def assert_leaving_mid_stream_aborts(
    host: str, port: int, api_key: str, engine_stats: Callable[[], dict]
) -> None:
    """A streaming client that leaves after its first chunk: its engine request stops, its KV blocks free."""
    before = engine_stats()
    conn = http.client.HTTPConnection(host, port, timeout=60)
    body = {"model": "tiny", "prompt": "long", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    assert engine_stats()["num_running"] == 1
    conn.close()
    deadline = time.monotonic() + 30
    while (after := engine_stats())["num_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["num_running"] == 0 and after["num_free_blocks"] == after["num_total_blocks"]
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < 4000


def test_a_client_leaving_mid_stream_aborts_its_request_in_the_same_replica(served):
    config, _ = served
    assert_leaving_mid_stream_aborts("127.0.0.1", config.port, API_KEY, _engine_stats)
