"""Pure pieces of raylane.serving: request validation, stream deltas, configs, CLI parsing, gRPC stubs."""

from __future__ import annotations

import argparse
import pickle

import pytest

from raylane.runner import CompletionOutput
from raylane.serving import (
    AutoscalingSettings,
    BadRequestError,
    ModelDeploymentConfig,
    ModelNotFoundError,
    OverloadedError,
    ServingConfig,
)
from raylane.serving.cli import add_serve_parser, config_from_args
from raylane.serving.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from raylane.serving.streaming import DeltaTracker


def _bad(model, body) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        parse_request(model, body)
    return info.value


def test_completion_request_defaults_and_prompt_forms():
    request = parse_request(CompletionRequest, {"model": "m", "prompt": "hi"})
    assert request.max_tokens == 16 and request.n == 1 and request.prompts() == ["hi"]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [[1], [2, 3]]}).prompts() == [
        [1],
        [2, 3],
    ]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "x", "stop": "a"}).stop == ["a"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "top_k": 0}, "top_k"),
        ({"model": "m", "prompt": "x", "logprobs": 3}, "logprobs"),
        ({"model": "m", "prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, None),
    ],
)
def test_completion_request_rejects_bad_parameters(body, param):
    error = _bad(CompletionRequest, body)
    assert error.status_code == 400 and error.param == param
    assert error.to_dict()["error"]["type"] == "invalid_request_error"


def test_chat_request_validation():
    request = parse_request(
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        },
    )
    assert request.chat_messages() == [{"role": "user", "content": "ab"}]
    assert request.requested_max_tokens is None
    assert (
        parse_request(
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5},
        ).requested_max_tokens
        == 5
    )
    assert _bad(ChatCompletionRequest, {"model": "m", "messages": []}).param == "messages"
    assert _bad(
        ChatCompletionRequest, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}
    ).param.startswith("messages")
    assert _bad(ChatCompletionRequest, ["not", "an", "object"]).param is None


def test_errors_pickle_with_their_fields_and_map_to_statuses():
    import grpc

    for error, status, code in (
        (BadRequestError("bad", param="n"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFoundError("no such model"), 404, grpc.StatusCode.NOT_FOUND),
        (OverloadedError("busy"), 503, grpc.StatusCode.UNAVAILABLE),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.to_dict() == error.to_dict()
        assert copy.status_code == status and copy.grpc_code == code
        assert set(copy.to_dict()["error"]) == {"message", "type", "param", "code"}


def _completion(text: str, token_ids: list[int], finish_reason: str | None = None) -> CompletionOutput:
    return CompletionOutput(
        index=0,
        text=text,
        token_ids=token_ids,
        logprobs=None,
        finish_reason=finish_reason,
        weight_versions=[0] * len(token_ids),
    )


def test_delta_tracker_holds_back_possible_stop_prefix_and_partial_characters():
    tracker = DeltaTracker(stop=["STOP"])
    assert [d.text for d in tracker.deltas([_completion("hello S", [1])])] == ["hell"]
    # The engine cut the text at the completed stop string: nothing sent must be taken back.
    deltas = tracker.deltas([_completion("hello ", [1, 2], "stop")])
    assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [("o ", [2], "stop")]
    assert tracker.deltas([_completion("hello ", [1, 2], "stop")]) == []

    tracker = DeltaTracker()
    assert [d.text for d in tracker.deltas([_completion("ab\ufffd", [1])])] == ["ab"]
    assert [d.text for d in tracker.deltas([_completion("ab€", [1, 2])])] == ["€"]
    # A token that adds no settled text still streams its id.
    assert [(d.text, d.token_ids) for d in tracker.deltas([_completion("ab€\ufffd", [1, 2, 3])])] == [
        ("", [3])
    ]
    assert [d.text for d in tracker.deltas([_completion("ab€\ufffd", [1, 2, 3], "length")])] == ["\ufffd"]


def test_deployment_options_fixed_and_autoscaling(tmp_path):
    fixed = ModelDeploymentConfig.from_path(str(tmp_path / "ckpt"), num_replicas=3)
    options = fixed.deployment_options()
    assert fixed.name == "ckpt" and options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 256  # sized for a batching engine, not Serve's default
    scaled = ModelDeploymentConfig.from_path(
        str(tmp_path / "ckpt"),
        name="org/model:v1",
        autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=3),
    )
    options = scaled.deployment_options()
    assert options["name"] == "LLMServer-org_model_v1" and "num_replicas" not in options
    assert options["autoscaling_config"]["target_ongoing_requests"] == 64
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="unique"):
        ServingConfig(models=[fixed, fixed])


def test_a_cuda_engine_reserves_a_gpu_for_its_replica(tmp_path):
    # Ray hides every GPU from an actor that reserves none, so a CUDA replica needs num_gpus.
    path = str(tmp_path / "ckpt")
    assert ModelDeploymentConfig.from_path(path).deployment_options()["ray_actor_options"]["num_gpus"] == 0
    cuda = ModelDeploymentConfig.from_path(path, engine={"device": "cuda"})
    assert cuda.deployment_options()["ray_actor_options"]["num_gpus"] == 1
    assert (
        ModelDeploymentConfig.from_path(path, engine={"device": "cuda:0"}, num_gpus=0.5).replica_gpus == 0.5
    )
    with pytest.raises(ValueError, match="sees no GPU"):
        ModelDeploymentConfig.from_path(path, engine={"device": "cuda"}, num_gpus=0)
    cli = config_from_args(_parse(["--model", path, "--device", "cuda"]))
    assert cli.models[0].replica_gpus == 1


def _deployments(config: ServingConfig) -> tuple[dict[str, object], str]:
    """The deployments of the application `build_app` makes, by name, and the name of its ingress."""
    from ray.serve._private.build_app import build_app as build_deployments

    from raylane.serving import build_app

    built = build_deployments(build_app(config), name=config.app_name)
    return {d.name: d for d in built.deployments}, built.ingress_deployment_name


def test_one_model_runs_the_ingress_in_its_replicas_unless_told_otherwise(tmp_path):
    one = ModelDeploymentConfig.from_path(str(tmp_path / "a"), num_gpus=0.5, max_ongoing_requests=64)
    other = ModelDeploymentConfig.from_path(str(tmp_path / "b"))
    alone, ingress = _deployments(ServingConfig(models=[one]))
    # The model's deployment, with the model's sizing, is the ingress.
    assert set(alone) == {"LLMServer-a"} and ingress == "LLMServer-a"
    assert alone[ingress].ray_actor_options["num_gpus"] == 0.5 and alone[ingress].max_ongoing_requests == 64
    routed, ingress = _deployments(ServingConfig(models=[one], ingress="separate"))
    assert set(routed) == {"OpenAIIngress", "LLMServer-a"} and ingress == "OpenAIIngress"
    several, ingress = _deployments(ServingConfig(models=[one, other]))
    assert set(several) == {"OpenAIIngress", "LLMServer-a", "LLMServer-b"} and ingress == "OpenAIIngress"
    with pytest.raises(ValueError, match="set ingress to 'separate'"):
        ServingConfig(models=[one, other], ingress="with_model")
    flags = config_from_args(_parse(["--model", str(tmp_path / "a"), "--ingress", "separate"]))
    assert flags.ingress == "separate" and not flags.ingress_with_model


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_cli_builds_the_serving_config(tmp_path):
    config = config_from_args(
        _parse(
            [
                "--model",
                f"a={tmp_path}/x",
                "--model",
                f"{tmp_path}/y",
                "--port",
                "8123",
                "--grpc-port",
                "-1",
                "--min-replicas",
                "1",
                "--max-replicas",
                "4",
                "--target-ongoing-requests",
                "32",
                "--max-num-seqs",
                "16",
            ]
        )
    )
    assert [m.name for m in config.models] == ["a", "y"] and config.port == 8123 and config.grpc_port is None
    assert all(
        m.autoscaling.max_replicas == 4 and m.autoscaling.target_ongoing_requests == 32 for m in config.models
    )
    assert config.models[0].engine.max_num_seqs == 16 and config.models[0].engine.model == f"{tmp_path}/x"
    config = config_from_args(_parse(["--model", str(tmp_path), "--name", "policy", "--replicas", "2"]))
    assert config.models[0].name == "policy" and config.models[0].num_replicas == 2
    with pytest.raises(ValueError, match="not both"):
        config_from_args(_parse(["--model", str(tmp_path), "--replicas", "2", "--max-replicas", "3"]))
    with pytest.raises(ValueError, match="nothing to serve"):
        config_from_args(_parse([]))


def test_grpc_stubs_are_generated_from_the_proto():
    from raylane.serving import proto
    from raylane.serving.proto import llm_pb2, llm_pb2_grpc

    service = llm_pb2.DESCRIPTOR.services_by_name["LLMService"]
    assert service.full_name == "raylane.serving.v1.LLMService"
    assert {m.name for m in service.methods} == {"Generate", "GenerateStream", "Health"}
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert callable(llm_pb2_grpc.add_LLMServiceServicer_to_server)
    # Generated into the cache, not the source tree, and reused on the next import.
    stub_dir = proto.ensure_stubs()
    assert (
        (stub_dir / "llm_pb2.py")
        .read_text()
        .startswith("# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.")
    )
    assert not (proto.PROTO_FILE.parent / "llm_pb2.py").exists()
    message = llm_pb2.GenerateRequest(model="m", prompt="hi", sampling=llm_pb2.SamplingOptions(max_tokens=3))
    assert llm_pb2.GenerateRequest.FromString(message.SerializeToString()) == message


def test_every_public_name_resolves():
    import raylane.serving

    for name in raylane.serving.__all__:
        assert getattr(raylane.serving, name) is not None


def test_serve_config_file_goes_through_the_project_loader(tmp_path):
    # YAML 1.2 as in job configs: "no" is a string (YAML 1.1 reads a boolean), and a typo names the key.
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(
        "app_name: no\nport: 8124\nmodels:\n  - {name: a, engine: {model: /m, max_num_seqs: 8}}\n"
    )
    config = config_from_args(_parse(["--config", str(config_path)]))
    assert config.app_name == "no" and config.port == 8124 and config.models[0].engine.max_num_seqs == 8
    config_path.write_text("prot: 8124\n")
    with pytest.raises(ValueError, match="unknown key 'prot' \\(did you mean 'port'\\?\\)"):
        config_from_args(_parse(["--config", str(config_path), "--model", str(tmp_path)]))


def test_grpc_listens_everywhere_so_it_needs_an_api_key_or_an_explicit_opt_out(tmp_path, monkeypatch):
    from raylane.models import make_tiny_model
    from raylane.serving import deploy
    from raylane.serving.auth import read_api_key

    model = make_tiny_model(str(tmp_path / "m"))
    monkeypatch.delenv("RAYLANE_API_KEY", raising=False)
    config = ServingConfig(models=[ModelDeploymentConfig.from_path(model)], grpc_port=9000)
    with pytest.raises(ValueError, match=r"every interface \(\[::\]:9000.*grpc_without_api_key"):
        deploy(config)  # refused before Serve (or Ray) is touched
    assert ServingConfig(models=config.models).grpc_port is None  # gRPC is off unless asked for

    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    monkeypatch.setenv("RAYLANE_API_KEY", "from-the-env")
    assert read_api_key(config) == "from-the-env"
    assert read_api_key(config.model_copy(update={"api_key_file": str(key_file)})) == "from-a-file"
    key_file.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(config.model_copy(update={"api_key_file": str(key_file)}))
