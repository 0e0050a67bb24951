"""The trainer's model set-up: FSDP2 mixed precision (fp32 master weights) and activation checkpointing;
micro-batches grouped by response length give the whole batch's log-probs and gradients.

One process, a real one-rank gloo group: FSDP2's hooks (all-gather in the compute dtype, fp32
gradient reduction, recomputation in backward) run as they do on every rank of a job.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from raylane.batch import Batch
from raylane.models import load_model
from raylane.roles.training import (
    forward_micro_batches,
    micro_batches,
    optimizer_steps,
    policy_log_probs,
    shard_model,
)
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


def _long_tailed_batch() -> Batch:
    """Six rows, prompts left-padded, responses right-padded: most answers short, one ~10x longer."""
    torch.manual_seed(1)
    prompt_lens, response_lens = [3, 5, 4, 5, 2, 4], [2, 1, 3, 20, 2, 1]
    width_p, width_r = max(prompt_lens), max(response_lens)
    prompts = torch.zeros(6, width_p, dtype=torch.long)
    responses = torch.zeros(6, width_r, dtype=torch.long)
    attention = torch.zeros(6, width_p + width_r, dtype=torch.long)
    response_mask = torch.zeros(6, width_r)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompts[row, width_p - p :] = torch.randint(3, 60, (p,))
        responses[row, :r] = torch.randint(3, 60, (r,))
        attention[row, width_p - p : width_p + r] = 1
        response_mask[row, :r] = 1
    return Batch.from_dict(
        {
            "prompts": prompts,
            "responses": responses,
            "attention_mask": attention,
            "response_mask": response_mask,
        }
    )


def test_length_grouped_micro_batches_give_the_whole_batch_log_probs_and_gradients(tiny_model_dir, mesh):
    batch = _long_tailed_batch()
    mask = batch["response_mask"].bool()
    micros, order = micro_batches(batch, 2, group_by_length=True)
    # Sorted by length, each cut to its longest: the long answer no longer widens the short rows.
    assert [m["responses"].shape[1] for m in micros] == [1, 2, 20] and sorted(order.tolist()) == list(
        range(6)
    )

    def run(micro_batch_size: int, grouped: bool):
        torch.manual_seed(0)
        model = shard_model(
            load_model(tiny_model_dir, torch.float32, torch.device("cpu")), mesh, torch.float32
        )
        log_probs = forward_micro_batches(
            batch,
            micro_batch_size,
            lambda m: policy_log_probs(model, m, 1.0, torch.device("cpu"))[0],
            grouped,
        )

        def token_mean_nll(micro):
            response_mask = micro["response_mask"]
            lp = policy_log_probs(model, micro, 1.0, torch.device("cpu"))[0]
            return -(lp * response_mask).sum() / response_mask.sum(), {}

        worker = SimpleNamespace(
            model=model,
            config=SimpleNamespace(micro_batch_size=micro_batch_size, optim=SimpleNamespace(grad_clip=None)),
            dp_size=1,
            global_step=0,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer_steps(worker, batch, token_mean_nll, "t", optimizer=optimizer, group_by_length=grouped)
        return log_probs, {name: p.grad.full_tensor() for name, p in model.named_parameters()}

    whole_log_probs, whole_grads = run(len(batch), grouped=False)
    grouped_log_probs, grouped_grads = run(2, grouped=True)
    torch.testing.assert_close(grouped_log_probs[mask], whole_log_probs[mask], rtol=1e-5, atol=1e-5)
    assert grouped_log_probs.shape == whole_log_probs.shape
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
