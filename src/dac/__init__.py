"""dac — Differentiable Auto-Cropping (Top et al.) as a Theseus-based PyTorch layer.

    >>> import torch, dac
    >>> dac.DACrop(output_size=(20, 37), pool_size=4)(torch.rand(1, 1, 120, 200)).shape
    torch.Size([1, 1, 20, 37])
"""
import warnings

# theseus 0.2.3 warns on import when scikit-sparse is absent; dac uses dense solvers only.
warnings.filterwarnings("ignore", message="Couldn't import skparse", category=UserWarning)
try:
    import theseus  # noqa: F401
except ModuleNotFoundError as _missing:  # pip cannot install it as a plain dependency (see pyproject.toml)
    if _missing.name != "theseus":
        raise
    raise ModuleNotFoundError(
        "dac needs theseus-ai 0.2.3, which is not installed; install it with: "
        "pip install --no-build-isolation --no-deps theseus-ai==0.2.3 (after torch)",
        name="theseus",
    ) from None

from . import functional  # noqa: E402
from ._checks import DACInputError  # noqa: E402
from .layer import BACKWARD_MODES, DACrop
from .optim import AscentSchedule, DACSolverInfo

__all__ = ["AscentSchedule", "BACKWARD_MODES", "DACInputError", "DACSolverInfo", "DACrop", "functional"]
__version__ = "0.1.0"
