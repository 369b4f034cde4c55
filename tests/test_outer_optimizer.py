"""The outer step: pseudo-gradient sign, Nesterov SGD against torch, and the mix."""
from __future__ import annotations

import pytest
import torch

from streaming_muloco.outer_optimizer import (OuterNesterovSGD, eager_arrived, eager_outer_grad, eager_pending, mix,
                                              pseudo_grad)


@pytest.mark.parametrize("lr,momentum,nesterov", [(0.7, 0.9, True), (0.4, 0.6, True), (0.9, 0.8, False),
                                                  (0.5, 0.0, False)])
def test_matches_torch_sgd_over_several_steps(lr: float, momentum: float, nesterov: bool) -> None:
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(37, generator=g)
    deltas = [torch.randn(37, generator=g) for _ in range(5)]

    ref = torch.nn.Parameter(theta0.clone())
    sgd = torch.optim.SGD([ref], lr=lr, momentum=momentum, nesterov=nesterov)
    ours = theta0.clone()
    opt = OuterNesterovSGD(lr, momentum, nesterov)
    for d in deltas:
        ref.grad = d.clone()
        sgd.step()
        opt.step(ours, d)
        torch.testing.assert_close(ours, ref.detach(), rtol=0, atol=0)


def test_pseudo_grad_sign_moves_global_towards_local() -> None:
    theta_g = torch.zeros(4)
    local = torch.tensor([1.0, -2.0, 3.0, 0.5])
    delta = pseudo_grad(theta_g, local)
    torch.testing.assert_close(delta, theta_g - local)
    OuterNesterovSGD(lr=0.5, momentum=0.0).step(theta_g, delta)
    torch.testing.assert_close(theta_g, 0.5 * local)


def test_pseudo_grad_into_the_local_buffer_equals_the_fresh_result() -> None:
    g = torch.Generator().manual_seed(0)
    theta_g, local = torch.randn(33, generator=g), torch.randn(33, generator=g)
    expected = pseudo_grad(theta_g, local)
    out = pseudo_grad(theta_g, local, out=local)
    assert out is local and torch.equal(out, expected)


def test_lr_one_no_momentum_lands_exactly_on_the_local_params() -> None:
    """Exact for representable values; within rounding of θ_g − (θ_g − θ_local) in general."""
    theta_g, local = torch.tensor([4.0, -1.5, 0.25, 8.0]), torch.tensor([1.0, 2.5, -0.75, 8.0])
    OuterNesterovSGD(lr=1.0, momentum=0.0).step(theta_g, pseudo_grad(theta_g, local))
    assert torch.equal(theta_g, local)

    g = torch.Generator().manual_seed(1)
    theta_g, local = torch.randn(64, generator=g), torch.randn(64, generator=g)
    OuterNesterovSGD(lr=1.0, momentum=0.0).step(theta_g, pseudo_grad(theta_g, local))
    torch.testing.assert_close(theta_g, local, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha,expected", [(0.0, [10.0, 20.0]), (0.5, [5.5, 11.0]), (1.0, [1.0, 2.0])])
def test_mix_keeps_alpha_of_the_local_progress(alpha: float, expected: list[float]) -> None:
    local_now, outer = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])
    out = mix(local_now, outer, alpha)
    torch.testing.assert_close(out, torch.tensor(expected))
    torch.testing.assert_close(out, alpha * local_now + (1 - alpha) * outer)
    assert out.data_ptr() not in (local_now.data_ptr(), outer.data_ptr())


def test_state_dict_round_trip_continues_identically() -> None:
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(8, generator=g) for _ in range(4)]
    a, theta_a = OuterNesterovSGD(0.7, 0.9), torch.zeros(8)
    for d in deltas[:2]:
        a.step(theta_a, d)
    b, theta_b = OuterNesterovSGD(0.7, 0.9), theta_a.clone()
    b.load_state_dict(a.state_dict())
    assert b.steps == 2
    for d in deltas[2:]:
        a.step(theta_a, d)
        b.step(theta_b, d)
    assert torch.equal(theta_a, theta_b)


def test_state_dict_does_not_alias_the_buffer() -> None:
    opt = OuterNesterovSGD(0.7, 0.9)
    opt.step(torch.zeros(3), torch.ones(3))
    state = opt.state_dict()
    opt.step(torch.zeros(3), torch.ones(3))
    assert torch.equal(state["momentum_buffer"], torch.ones(3))


@pytest.mark.parametrize("kwargs,key", [
    (dict(lr=0.0), "outer_lr"),
    (dict(lr=float("nan")), "outer_lr"),
    (dict(momentum=1.0), "outer_momentum"),
    (dict(momentum=-0.1), "outer_momentum"),
])
def test_bad_hyperparameters_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        OuterNesterovSGD(**kwargs)


def test_mix_rejects_alpha_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"^mix_alpha \(1\.5\) must be in"):
        mix(torch.zeros(1), torch.zeros(1), 1.5)


def test_eager_rule_is_fresh_share_plus_the_others_previous_share() -> None:
    """g = (1/K) fresh_k + (1/K) sum_{j != k} previous_j, through the others buffer's life cycle."""
    K, torch_gen = 3, torch.Generator().manual_seed(0)
    prev = [torch.randn(8, generator=torch_gen) for _ in range(K)]
    fresh = torch.randn(8, generator=torch_gen)
    others = torch.zeros(8)
    torch.testing.assert_close(eager_outer_grad(others, prev[0], 1 / K), prev[0] / K)  # round 1: nothing earlier
    eager_pending(others, prev[0], 1 / K)
    eager_arrived(others, torch.stack(prev).mean(0))
    g = eager_outer_grad(others, fresh, 1 / K)
    torch.testing.assert_close(g, fresh / K + (prev[1] + prev[2]) / K)


def test_eager_replicas_differ_by_their_latest_fresh_term_only() -> None:
    """With plain outer SGD the eager terms telescope: after R rounds replica k holds
    theta_0 - lr * (sum of the R-1 complete averages) - lr * (1/K) * (its own latest delta)."""
    K, R, lr, gen = 4, 6, 0.7, torch.Generator().manual_seed(1)
    deltas = [[torch.randn(16, generator=gen) for _ in range(K)] for _ in range(R)]
    theta0 = torch.randn(16, generator=gen)
    thetas, others = [theta0.clone() for _ in range(K)], [torch.zeros(16) for _ in range(K)]
    opts = [OuterNesterovSGD(lr, momentum=0.0) for _ in range(K)]
    for r in range(R):
        for k in range(K):
            opts[k].step(thetas[k], eager_outer_grad(others[k], deltas[r][k], 1 / K))
            eager_pending(others[k], deltas[r][k], 1 / K)
        mean = torch.stack(deltas[r]).mean(0)
        for k in range(K):
            eager_arrived(others[k], mean)
    consensus = theta0 - lr * sum(torch.stack(d).mean(0) for d in deltas[:-1])
    for k in range(K):
        torch.testing.assert_close(thetas[k], consensus - lr * deltas[-1][k] / K, rtol=1e-5, atol=1e-5)
