"""Theseus glue: the DAC cost as a ``th.CostFunction`` and the staged-ascent solver."""
from .cost_function import DACCost
from .solver import AscentSchedule, DACSolverInfo, StagedAscent, build_objective

__all__ = ["AscentSchedule", "DACCost", "DACSolverInfo", "StagedAscent", "build_objective"]
