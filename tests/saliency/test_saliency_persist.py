"""dac.saliency.persist: save, load (weights-only) and the DACrop a stage was trained with."""
from __future__ import annotations

import pytest
import torch

from dac import DACInputError
from dac.saliency import LEARNED_DEFAULTS, SaliencyNet, load_dacrop, load_saliency, save_saliency


class TestPersist:
    def test_save_and_load(self, tmp_path):
        net = SaliencyNet(pool_size=5, width=8)
        with torch.no_grad():
            net.gate.weight.normal_()
        save_saliency(net, tmp_path / "s.pt", phantoms=3)
        again = load_saliency(tmp_path / "s.pt")
        x = torch.rand(1, 1, 60, 90)
        torch.testing.assert_close(again(x), net(x))
        assert not again.training
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(DACInputError, match="saliency: .* is not a saliency stage"):
            load_saliency(tmp_path / "bad.pt")
        with pytest.raises(DACInputError, match="no such file"):
            load_saliency(tmp_path / "missing.pt")

    def test_members_are_saved(self, tmp_path):
        net = SaliencyNet(pool_size=5, width=4, members=3)
        with torch.no_grad():
            net.gate.weight.normal_()
        save_saliency(net, tmp_path / "s.pt")
        again = load_saliency(tmp_path / "s.pt")
        assert again.members == 3
        x = torch.rand(1, 1, 60, 90)
        torch.testing.assert_close(again(x), net(x))

    def test_load_dacrop_of_a_stage_saved_without_settings(self, tmp_path):
        save_saliency(SaliencyNet(4, width=4), tmp_path / "plain.pt")
        with pytest.warns(UserWarning, match="no DACrop settings"):
            layer = load_dacrop(tmp_path / "plain.pt")
        assert layer.r_min_fraction == LEARNED_DEFAULTS["r_min_fraction"] and layer.pool_size == 4
        assert layer.schedule.sharpness_factor == LEARNED_DEFAULTS["sharpness_factor"]

    @pytest.mark.parametrize("stored", ["not json", "[1, 2]", '{"saliency": 1}', '{"pool_size": 4, "bogus": 1}'])
    def test_load_dacrop_with_bad_settings_is_one_clear_error(self, tmp_path, stored):
        save_saliency(SaliencyNet(4, width=4), tmp_path / "bad.pt", dacrop=stored)
        with pytest.raises(DACInputError, match="saliency"):
            load_dacrop(tmp_path / "bad.pt")

    def test_loading_draws_nothing_from_the_global_random_state(self, tmp_path):
        save_saliency(SaliencyNet(4, width=4), tmp_path / "s.pt", dacrop='{"output_size": [20, 37]}')
        before = torch.random.get_rng_state()
        load_dacrop(tmp_path / "s.pt")
        assert torch.equal(torch.random.get_rng_state(), before)
