"""The trainer's model set-up: FSDP2 mixed precision (fp32 master weights) and activation checkpointing.

One process, a real one-rank gloo group: FSDP2's hooks (all-gather in the compute dtype, fp32
gradient reduction, recomputation in backward) run as they do on every rank of a job.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from raylane.models import load_model
from raylane.roles.training import shard_model
from tests.conftest import free_port


@pytest.fixture(scope="module")
def mesh():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _loss_and_grads(model_dir, mesh, compute_dtype, activation_checkpointing):
    torch.manual_seed(0)
    model = shard_model(
        load_model(model_dir, torch.float32, torch.device("cpu")),
        mesh,
        compute_dtype,
        activation_checkpointing,
    )
    calls = []
    mlp = model.model.layers[0].mlp
    forward = mlp.forward
    # Counted inside forward: module hooks do not fire when checkpointing recomputes a layer.
    mlp.forward = lambda *args: calls.append(1) or forward(*args)
    ids = torch.randint(3, 60, (4, 12))
    logits = model(ids, attention_mask=torch.ones_like(ids))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {name: param.grad.full_tensor() for name, param in model.named_parameters()}
    # Recomputation in backward runs each layer's forward a second time.
    assert len(calls) == (2 if activation_checkpointing else 1)
    return model, logits, loss.detach(), grads


def test_activation_checkpointing_gives_the_same_gradients(tiny_model_dir, mesh):
    _, _, loss, grads = _loss_and_grads(tiny_model_dir, mesh, torch.float32, False)
    _, _, recomputed_loss, recomputed = _loss_and_grads(tiny_model_dir, mesh, torch.float32, True)
    torch.testing.assert_close(recomputed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(recomputed[name], grad, msg=name)


def test_bf16_compute_keeps_fp32_master_weights(tiny_model_dir, mesh):
    _, _, loss, grads = _loss_and_grads(tiny_model_dir, mesh, torch.float32, False)
    model, logits, bf16_loss, bf16_grads = _loss_and_grads(tiny_model_dir, mesh, torch.bfloat16, False)
    assert logits.dtype == torch.bfloat16, "the forward should compute in bf16"
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, f"{name}: master weights must stay fp32"
        assert param.grad.dtype == torch.float32, f"{name}: gradients must be reduced into fp32"
    assert abs(float(bf16_loss) - float(loss)) < 0.02 * float(loss)
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in bf16_grads.values()]),
        torch.cat([g.flatten() for g in grads.values()]),
        dim=0,
    )
    assert cosine > 0.99
