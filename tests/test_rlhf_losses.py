"""PPO policy/value losses, loss aggregation and KL estimators against hand-worked numbers."""

import math

import pytest
import torch

from raylane.rlhf import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    AdaptiveKLController,
    aggregate_loss,
    apply_kl_penalty,
    kl_loss,
    kl_penalty,
    ppo_policy_loss,
    truncated_importance_weights,
    value_loss,
)

# Per-token cases for clip 0.2 (old log-prob 0, so the ratio r = exp(log_prob)):
#   (A, r)       -A*r   -A*clip(r)  PPO loss   clipped term active
#   ( 1, 1.5)    -1.5   -1.2        -1.2       yes
#   ( 1, 0.5)    -0.5   -0.8        -0.5       no
#   (-1, 1.5)     1.5    1.2         1.5       no
#   (-1, 0.5)     0.5    0.8         0.8       yes
#   (-1, 4.0)     4.0    1.2         4.0       no   (dual clip c=3 caps it at 3.0)
ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
RATIOS = torch.tensor([[1.5, 0.5, 1.5, 1.0], [0.5, 4.0, 1.0, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def assert_close(actual, expected, atol=1e-6):
    """Elementwise comparison of a tensor with (nested lists of) hand-computed numbers."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def policy_loss(**kwargs):
    log_probs = RATIOS.log().requires_grad_()
    loss, metrics = ppo_policy_loss(log_probs, torch.zeros(2, 4), ADVANTAGES, MASK, **kwargs)
    return log_probs, loss, metrics


def test_ppo_clipped_loss_token_mean():
    log_probs, loss, metrics = policy_loss()
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 4.0) / 5)
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    assert metrics["ppo_kl"].item() == pytest.approx(-sum(math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 4.0)) / 5)
    loss.backward()
    # Clipped tokens get no gradient; the others d(-A r)/d log r = -A r, over 5 tokens.
    assert_close(log_probs.grad, [[0.0, -0.5 / 5, 1.5 / 5, 0.0], [0.0, 4.0 / 5, 0.0, 0.0]])


def test_decoupled_ppo_weighs_each_token_by_its_truncated_behaviour_ratio():
    # Proximal log-probs 0 (the trainer's), behaviour ones log(1/w): weights w, truncated at 2.
    behaviour = -torch.tensor([[0.5, 1.0, 3.0, 1.0], [1.0, 0.25, 1.0, 1.0]]).log()
    weights = truncated_importance_weights(torch.zeros(2, 4), behaviour, cap=2.0)
    assert_close(weights, [[0.5, 1.0, 2.0, 1.0], [1.0, 0.25, 1.0, 1.0]])
    log_probs, loss, _ = policy_loss(importance_weights=weights)
    # The PPO losses of the table above, each times its weight.
    assert loss.item() == pytest.approx((-1.2 * 0.5 - 0.5 + 1.5 * 2.0 + 0.8 + 4.0 * 0.25) / 5)
    loss.backward()
    assert_close(log_probs.grad, [[0.0, -0.5 / 5, 3.0 / 5, 0.0], [0.0, 1.0 / 5, 0.0, 0.0]])
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(torch.zeros(1), torch.zeros(1), cap=0.0)


def test_ppo_dual_clip_caps_negative_advantage_tokens():
    log_probs, loss, metrics = policy_loss(clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 3.0) / 5)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 5)
    loss.backward()
    assert log_probs.grad[1, 1].item() == 0.0
    with pytest.raises(ValueError, match=r"clip_ratio_c must be > 1\.0"):
        policy_loss(clip_ratio_c=0.9)


def test_ppo_dual_clip_does_not_touch_positive_advantages():
    log_probs = torch.tensor([[math.log(10.0)]])
    loss, metrics = ppo_policy_loss(
        log_probs, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip_ratio_c=3.0
    )
    assert loss.item() == pytest.approx(-1.2)
    assert metrics["pg_clipfrac_lower"].item() == 0.0


def test_ppo_asymmetric_clip_higher():
    _, loss, _ = policy_loss(clip_ratio_high=0.6)
    # (1, 1.5) is now inside [0.8, 1.6]: -1.5 instead of -1.2.
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 1.5 + 0.8 + 4.0) / 5)


def test_ppo_sequence_aggregations():
    _, seq_mean, _ = policy_loss(loss_agg_mode="seq-mean-token-mean")
    assert seq_mean.item() == pytest.approx(((-1.2 - 0.5 + 1.5) / 3 + (0.8 + 4.0) / 2) / 2)
    _, seq_sum, _ = policy_loss(loss_agg_mode="seq-mean-token-sum")
    assert seq_sum.item() == pytest.approx(((-1.2 - 0.5 + 1.5) + (0.8 + 4.0)) / 2)


def test_ppo_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"advantages \(2, 3\)"):
        ppo_policy_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 4))


def test_aggregations_skip_empty_sequences():
    loss_mat = torch.tensor([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    assert aggregate_loss(loss_mat, mask, "token-mean").item() == pytest.approx(2.0)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx(2.25)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx(3.0)
    with pytest.raises(
        ValueError, match="unknown loss aggregation mode 'mean'; valid names: seq-mean-token-mean"
    ):
        aggregate_loss(loss_mat, mask, "mean")


def test_value_loss_clipped_and_unclipped():
    values = torch.tensor([[1.0, 0.6, 0.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, metrics = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: max(0, (0.7 - 1)^2) = .09 (clip active); token 1: .36; token 2: max(1, (.3 - 1)^2) = 1
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.36 + 1.0) / 3)
    assert metrics["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # token 0's loss comes from the clipped (constant) prediction: no gradient.
    assert_close(values.grad, [[0.0, 0.6 / 3, -1.0 / 3]])
    plain, plain_metrics = value_loss(values, old_values, returns, mask, clip_range=None)
    assert plain.item() == pytest.approx(0.5 * (0.0 + 0.36 + 1.0) / 3)
    assert plain_metrics["vf_clipfrac"].item() == 0.0


def test_kl_estimators_hand_computed():
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    ln2 = math.log(2)
    assert_close(kl_penalty(log_probs, ref, "k1"), [[ln2, -ln2]])
    assert_close(kl_penalty(log_probs, ref, "k2"), [[ln2**2 / 2, ln2**2 / 2]])
    # k3 = q/p - log(q/p) - 1 with q/p = .5 and 2
    assert_close(kl_penalty(log_probs, ref, "k3"), [[0.5 + ln2 - 1, 2 - ln2 - 1]])
    assert_close(kl_penalty(log_probs, ref, "abs"), [[ln2, ln2]])
    assert torch.equal(kl_penalty(log_probs, ref, "low_var_kl"), kl_penalty(log_probs, ref, "k3"))
    assert torch.equal(kl_penalty(log_probs, ref, "mse"), kl_penalty(log_probs, ref, "k2"))
    assert kl_penalty(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "k3").item() == 10.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid names: abs, k1, k2, k3"):
        kl_penalty(log_probs, ref, "k4")
    assert {"k1", "k3"} <= set(KL_ESTIMATORS.names())


def test_apply_kl_penalty_in_reward():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    log_probs = torch.tensor([[0.2, 0.2, 0.2], [0.4, 0.4, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, metrics = apply_kl_penalty(
        scores, log_probs, torch.zeros(2, 3), mask, kl_coef=0.1, estimator="k1"
    )
    assert_close(rewards, [[-0.02, -0.02, 0.98], [-0.04, 0.96, 0.0]])
    # Mean over sequences of the per-sequence mean KL: (0.2 + 0.4) / 2, not the token mean 1.4 / 5.
    assert metrics["kl"].item() == pytest.approx(0.3)


def test_kl_loss_gradient_reaches_policy_only():
    log_probs = torch.tensor([[math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 0.0]], requires_grad=True)
    loss = kl_loss(log_probs, ref, torch.tensor([[1.0, 0.0]]), estimator="k3")
    assert loss.item() == pytest.approx(0.5 + math.log(2) - 1)
    loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - q/p = 0.5
    assert_close(log_probs.grad, [[0.5, 0.0]])
    assert ref.grad is None


@pytest.mark.parametrize("estimator", KL_ESTIMATORS.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_gradients_stay_finite_at_extreme_log_prob_gaps(estimator, dtype):
    # Gaps of 100 and 1000 nats both ways (a token one policy all but rules out), on response
    # positions and on masked ones (padding whose log-probs are garbage).
    gaps = [100.0, -100.0, 1000.0, -1000.0, 0.5]
    ref = torch.tensor([[-2.0] * len(gaps), [-2.0] * len(gaps)], dtype=dtype)
    log_probs = (ref + torch.tensor(gaps, dtype=dtype)).detach().requires_grad_(True)
    mask = torch.tensor([[1.0] * len(gaps), [0.0] * len(gaps)], dtype=dtype)
    for agg in LOSS_AGGREGATIONS.names():
        log_probs.grad = None
        loss = kl_loss(log_probs, ref, mask, estimator=estimator, loss_agg_mode=agg)
        loss.backward()
        assert torch.isfinite(loss), (agg, loss)
        assert torch.isfinite(log_probs.grad).all(), (agg, log_probs.grad)
        assert torch.equal(log_probs.grad[1], torch.zeros_like(log_probs.grad[1])), "masked rows move"


def test_adaptive_kl_controller_moves_towards_target():
    controller = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    controller.load_state_dict({"value": 0.1})
    controller.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert controller.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    assert controller.state_dict() == {"value": controller.value}
    with pytest.raises(ValueError, match="target_kl and horizon must be > 0"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=1)
