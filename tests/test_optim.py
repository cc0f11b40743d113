"""dac.optim: the Theseus cost function and solver."""
from __future__ import annotations

import theseus as th
import torch

from dac.functional import fit_r_min, initial_theta, max_min_pool
from dac.optim import AscentSchedule, DACCost, StagedAscent, build_objective

from conftest import textured_scene


def converged_cost(scene: torch.Tensor) -> DACCost:
    """A DACCost whose theta is the converged box of ``scene`` (float64)."""
    saliency = 255 * max_min_pool(scene, 5)
    b, _, h, w = saliency.shape
    aspect = 20 / 37
    r_min = fit_r_min(h, w, 1 / 3.5, aspect, saliency)
    theta0 = initial_theta(h, w, r_min, aspect, 1 / 2.3)
    sharpness = torch.full((1, 1), 0.2, dtype=torch.float64)
    objective, cost, inputs = build_objective(theta0, saliency, sharpness, r_min[:, None], aspect)
    layer = th.TheseusLayer(StagedAscent(objective, AscentSchedule()), vectorize=False)
    with torch.no_grad():
        _, info = layer(inputs, optimizer_kwargs={"backward_mode": "implicit"})
    assert bool(info.converged.all())
    return cost


def test_check_jacobians_random_points():
    theta = th.Vector(tensor=torch.tensor([[20.0, 10.0, 2.0]], dtype=torch.float64), name="theta")
    cost = DACCost(
        theta,
        th.Variable(torch.rand(1, 1, 20, 40, dtype=torch.float64), name="saliency"),
        th.Variable(torch.full((1, 1), 0.3, dtype=torch.float64), name="sharpness"),
        th.Variable(torch.full((1, 1), 8.0, dtype=torch.float64), name="r_min"),
        aspect=0.5,
    )
    th.utils.check_jacobians(cost, num_checks=5, tol=1e-8)


def test_jacobian_is_autograd_of_error_at_converged_boxes():
    # Interior, border-held and r = 0 optima: the free rows are T^T H, held rows normals.
    for region, offset in [((0.65, 0.6), (0.12, 0.25)), ((0.8, 0.5), (0.12, 0.25)), ((0.4, 0.4), (0.12, 0.25)), ((0.4, 0.4), (0.0, 0.25))]:
        cost = converged_cost(textured_scene(2, 300, 555, region, offset))
        (jac,), err = cost.jacobians()
        theta0 = cost.theta.tensor.clone()

        def error_of(t):
            cost.theta.update(t)
            return cost.error()

        auto = torch.autograd.functional.jacobian(error_of, theta0)
        cost.theta.update(theta0)
        for b in range(theta0.shape[0]):
            torch.testing.assert_close(jac[b], auto[b, :, b, :], rtol=1e-9, atol=1e-14)
        assert err.abs().max() < 1e-12


def test_copy_keeps_configuration():
    cost = converged_cost(textured_scene(1, 300, 555))
    twin = cost.copy(new_name="twin")
    assert isinstance(twin, DACCost) and twin.aspect == cost.aspect
    torch.testing.assert_close(twin.error(), cost.error())


def test_solver_rejects_foreign_objective():
    objective = th.Objective()
    v = th.Vector(2, name="v")
    objective.add(th.Difference(v, th.Vector(2, name="t"), th.ScaleCostWeight(1.0)))
    try:
        StagedAscent(objective)
    except ValueError as e:
        assert "DACCost" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_objective_lives_where_its_tensors_are():
    # A per-call objective must follow its inputs' device (CUDA in practice; "meta" here),
    # or Theseus refuses to update it with the inputs.
    theta = torch.zeros(2, 3, device="meta")
    objective, _, _ = build_objective(
        theta, torch.zeros(2, 1, 5, 5, device="meta"), torch.ones(1, 1, device="meta"), torch.ones(2, 1, device="meta"), 0.5
    )
    assert objective.device == torch.device("meta")
