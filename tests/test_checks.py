"""dac._checks: the shared argument checks."""
from __future__ import annotations

import pytest
import torch

from dac import DACInputError
from dac._checks import check_device, check_int


class TestCheckDevice:
    def test_cpu_is_a_device(self):
        assert check_device("cpu") == torch.device("cpu")

    @pytest.mark.parametrize("value", ["gpu", "cuda:x", "", None])
    def test_not_a_device_names_the_argument(self, value):
        with pytest.raises(DACInputError, match="--device: expected a torch device"):
            check_device(value, "--device")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
    def test_cuda_without_a_gpu_is_refused(self):
        with pytest.raises(DACInputError, match="no CUDA device is available"):
            check_device("cuda:0", "device")


class TestCheckInt:
    @pytest.mark.parametrize("value", [True, 2.5, "3"])
    def test_not_an_int(self, value):
        with pytest.raises(DACInputError, match="n: expected an int"):
            check_int(value, "n", 0)

    def test_bounds(self):
        assert check_int(3, "n", 0, 3) == 3
        with pytest.raises(DACInputError, match=r"in \[0, 2\]"):
            check_int(3, "n", 0, 2)
