"""dac.saliency.features: window features against a loop over windows."""
from __future__ import annotations

import torch

from dac.functional import max_min_pool
from dac.saliency import FEATURES, saliency_features


class TestFeatures:
    def test_match_a_loop_over_windows(self):
        x = torch.rand(2, 3, 23, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        f = saliency_features(x, 5)
        assert f.shape == (2, len(FEATURES), 4, 6) and f.dtype == torch.float64
        for b in range(2):
            for i in range(4):
                for j in range(6):
                    win = x[b, :, 5 * i : 5 * i + 5, 5 * j : 5 * j + 5].reshape(3, -1)
                    expected = [
                        (win.amax(1) - win.amin(1)).mean(),
                        win.mean(1).mean(),
                        win.amax(1).mean(),
                        win.amin(1).mean(),
                        win.std(1, unbiased=False).mean(),
                    ]
                    torch.testing.assert_close(f[b, :, i, j], torch.stack(expected))

    def test_std_of_flat_windows_is_not_rounding_noise(self):
        # E[x^2] - E[x]^2 in float32 gave 4e-4 for a constant 0.7 and 65x the truth for 60000/60001.
        flat = saliency_features(torch.full((1, 1, 20, 20), 0.7), 10)[0, 4]
        assert flat.abs().max() < 1e-6
        alternating = torch.full((1, 1, 20, 20), 60000, dtype=torch.uint16)
        alternating[..., ::2] = 60001
        std = saliency_features(alternating, 10)[0, 4]
        torch.testing.assert_close(std, torch.full_like(std, 0.5 / 65535), rtol=1e-2, atol=0)

    def test_uint8_equals_float_and_channel_0_is_max_min(self):
        x = torch.randint(0, 256, (1, 1, 40, 60), dtype=torch.uint8)
        torch.testing.assert_close(saliency_features(x, 10), saliency_features(x.float() / 255, 10))
        torch.testing.assert_close(saliency_features(x, 10)[:, :1], max_min_pool(x, 10))
