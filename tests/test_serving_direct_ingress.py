"""``direct_ingress``: the model's replica serves HTTP on a port of its own, without Serve's proxy.

One application for the module, on Serve started with direct ingress (by `deploy`), with an API
key: answers from the replica's own address are checked against offline generation, streamed and
not, the key is still required there, the proxy still serves, and a client leaving mid-stream
still aborts its engine request. Last, on Serve started without it, `deploy` refuses clearly.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import openai
import pytest
from ray import serve

from raylane.models import make_tiny_model
from raylane.runner import LLM, SamplingParams
from raylane.serving import ServingConfig, deploy, deployment_name_for, direct_ingress_urls, undeploy
from tests.conftest import free_port
from tests.test_serving_one_deployment import assert_leaving_mid_stream_aborts

APP = "test-direct-ingress"
API_KEY = "key-of-the-direct-ingress-app"
MAX_MODEL_LEN = 4096
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "seed": 5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(
        str(tmp_path_factory.mktemp("direct") / "m"), std=0.3, max_position_embeddings=MAX_MODEL_LEN
    )


def _config(model_dir: str, direct_ingress: bool) -> ServingConfig:
    return ServingConfig(
        app_name=APP,
        models=[{"name": "tiny", "engine": {"model": model_dir, "max_model_len": MAX_MODEL_LEN}}],
        port=free_port(),
        direct_ingress=direct_ingress,
    )


@pytest.fixture(scope="module")
def served(ray_cluster, model_dir):
    # Serve's controller takes direct ingress when it starts: not from an earlier module's Serve.
    serve.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYLANE_API_KEY", API_KEY)
        config, offline = _config(model_dir, direct_ingress=True), LLM(model_dir, max_model_len=MAX_MODEL_LEN)
        deploy(config)
        # pytest runs what follows the yield whatever the tests did.
        yield config, offline
        undeploy(config)
        serve.shutdown()


def test_the_replica_answers_on_its_own_port_as_the_proxy_does(served):
    config, offline = served
    (url,) = direct_ingress_urls(config)
    assert urlsplit(url).hostname == "127.0.0.1" and urlsplit(url).port != config.port

    request = {"model": "tiny", "prompt": "direct", "max_tokens": 12, **SAMPLING}
    params = SamplingParams(max_tokens=12, **SAMPLING)
    want = offline.generate(["direct"], params, use_tqdm=False)[0].outputs[0].text
    for base in (url, f"http://127.0.0.1:{config.port}"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert client.completions.create(**request).choices[0].text == want
        stream = client.completions.create(**request, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == 12
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="x", max_tokens=2
        )


def _engine_stats() -> dict:
    return serve.get_deployment_handle(deployment_name_for("tiny"), APP).engine_stats.remote().result()


def test_a_client_leaving_a_direct_stream_aborts_its_request(served):
    config, _ = served
    address = urlsplit(direct_ingress_urls(config)[0])
    assert_leaving_mid_stream_aborts(address.hostname, address.port, API_KEY, _engine_stats)


def test_deploy_refuses_direct_ingress_on_serve_started_without_it(served, model_dir):
    config, _ = served
    undeploy(config)
    serve.shutdown()
    serve.start(http_options={"port": free_port()})
    direct = _config(model_dir, direct_ingress=True)
    with pytest.raises(RuntimeError, match="started without direct ingress"):
        deploy(direct)
    assert APP not in serve.status().applications
