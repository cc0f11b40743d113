"""dac.saliency.net: the learned stage starts at the paper's map; its gradient through the box; seeded initialisation."""
from __future__ import annotations

import pytest
import torch

from conftest import textured_scene
from dac import DACInputError, DACrop
from dac.functional import max_min_pool
from dac.saliency import BoxRegressor, SaliencyNet, feature_trunk, saliency_features

SMALL = dict(output_size=(20, 37), pool_size=5)


class TestSaliencyNet:
    def test_untrained_net_is_the_paper_map(self):
        images = textured_scene(2, 300, 555, dtype=torch.float32)
        net = SaliencyNet(pool_size=5)
        torch.testing.assert_close(net(images), max_min_pool(images, 5))
        paper = DACrop(**SMALL).locate(images)
        torch.testing.assert_close(DACrop(**SMALL, saliency=net).locate(images), paper)

    def test_gate_spans_zero_to_two(self):
        net = SaliencyNet(pool_size=5)
        images = textured_scene(1, 300, 555, dtype=torch.float32)
        paper = max_min_pool(images, 5)
        for bias, gate in ((50.0, 2.0), (-50.0, 0.0)):
            with torch.no_grad():
                net.gate.bias.fill_(bias)
            torch.testing.assert_close(net(images), gate * paper)

    @pytest.mark.parametrize("members", [1, 2])
    def test_gradient_of_the_boxes_matches_finite_differences(self, members):
        """d(loss on boxes) / d(parameters), through the implicit gradient of the box (float64)."""
        torch.manual_seed(0)
        net = SaliencyNet(pool_size=5, width=4, dilations=(1, 2), members=members).double()
        with torch.no_grad():  # a gate that depends on the parameters (zero-initialised otherwise)
            net.gate.weight.normal_(0, 0.5)
            net.gate.bias.fill_(0.1)
        layer = DACrop(**SMALL, saliency=net)
        images = textured_scene(2, 300, 555)
        weights = torch.tensor([[0.3, -1.2, 0.7, 0.4], [-0.5, 0.9, 1.1, -0.8]], dtype=torch.float64)
        params = [p for p in net.parameters()]
        grads = torch.autograd.grad((layer.locate(images) * weights).sum(), params)
        gen = torch.Generator().manual_seed(3)
        direction = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
        eps = 1e-8  # the trunk's ReLUs are kinks: a small step, as for max pooling (the FD error falls with it: 3e-5 at 1e-6)
        base = [p.detach().clone() for p in params]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, b, d in zip(params, base, direction):
                    p.copy_(b + sign * eps * d)
                values.append((layer.locate(images) * weights).sum().item())
        with torch.no_grad():
            for p, b in zip(params, base):
                p.copy_(b)
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(fd) > 1e-2  # the boxes really move with the parameters
        assert abs(analytic - fd) <= 2e-6 * abs(fd), (analytic, fd)

    def test_members_are_independent_gates_averaged(self):
        torch.manual_seed(0)
        pair = SaliencyNet(pool_size=5, width=4, dilations=(1, 2), members=2)
        images = textured_scene(2, 300, 555, dtype=torch.float32)
        torch.testing.assert_close(pair(images), max_min_pool(images, 5))  # untrained: the paper's map
        singles = [SaliencyNet(pool_size=5, width=4, dilations=(1, 2)) for _ in range(2)]
        with torch.no_grad():
            pair.gate.weight.normal_(0, 0.5)
            pair.gate.bias.copy_(torch.tensor([0.3, -0.2]))
            pair.log_scale.fill_(0.1)
            for m, single in enumerate(singles):  # member m's slices of the grouped weights
                for grouped, alone in zip(list(pair.trunk) + [pair.gate], list(single.trunk) + [single.gate]):
                    if isinstance(grouped, torch.nn.Conv2d):
                        n = alone.out_channels
                        alone.weight.copy_(grouped.weight[m * n : (m + 1) * n])
                        alone.bias.copy_(grouped.bias[m * n : (m + 1) * n])
                single.log_scale.copy_(pair.log_scale)
        features = saliency_features(images, 5)
        own = torch.cat([single.gate_logits(features) for single in singles], dim=1)
        torch.testing.assert_close(pair.member_logits(features), own)
        torch.testing.assert_close(pair.gate_logits(features), own.mean(dim=1, keepdim=True))
        torch.testing.assert_close(pair.member_maps(features)[:, 1:], singles[1].from_features(features))
        pair.member_maps(features)[:, 0].sum().backward()  # member 0's map leaves member 1's weights alone
        assert pair.gate.weight.grad[1].abs().sum() == 0 and pair.gate.weight.grad[0].abs().sum() > 0
        assert pair.trunk[0].weight.grad[4:].abs().sum() == 0 and pair.trunk[0].weight.grad[:4].abs().sum() > 0

    def test_bad_arguments(self):
        with pytest.raises(DACInputError, match="pool_size"):
            SaliencyNet(pool_size=0)
        with pytest.raises(DACInputError, match="members"):
            SaliencyNet(members=0)
        with pytest.raises(DACInputError, match="features"):
            SaliencyNet().from_features(torch.rand(1, 3, 10, 10))
        with pytest.raises(DACInputError, match="features"):  # the box regressor's heat map draws the same map
            BoxRegressor(0.5).heat_logits(torch.rand(1, 3, 10, 10))
        with pytest.raises(DACInputError, match="features"):
            BoxRegressor(0.5)(torch.rand(3, 10, 10), (100, 100))


class TestSeededInitialisation:
    def test_a_generator_gives_pytorchs_default_initialisation(self):
        # the same draws as nn.Conv2d's own reset_parameters from a global state of the same seed
        torch.manual_seed(7)
        reference = feature_trunk(4, (1, 2), groups=2)
        seeded = feature_trunk(4, (1, 2), groups=2, generator=torch.Generator().manual_seed(7))
        for a, b in zip(reference.parameters(), seeded.parameters()):
            assert torch.equal(a, b)

    def test_a_generator_leaves_the_global_random_state_alone(self):
        before = torch.random.get_rng_state()
        a = SaliencyNet(5, width=4, members=2, generator=torch.Generator().manual_seed(1))
        assert torch.equal(torch.random.get_rng_state(), before)
        b = SaliencyNet(5, width=4, members=2, generator=torch.Generator().manual_seed(1))
        c = SaliencyNet(5, width=4, members=2, generator=torch.Generator().manual_seed(2))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert not torch.equal(a.trunk[0].weight, c.trunk[0].weight)
        assert torch.equal(a.gate.weight, torch.zeros_like(a.gate.weight))  # still the paper's map
