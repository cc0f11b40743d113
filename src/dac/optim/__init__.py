"""Theseus glue: the DAC cost as a ``th.CostFunction``, the staged-ascent solver and the global search."""
from .cost_function import DACCost
from .global_search import GlobalSearch, GridSchedule
from .solver import AscentSchedule, DACSolverInfo, StagedAscent, build_objective

__all__ = ["AscentSchedule", "DACCost", "DACSolverInfo", "GlobalSearch", "GridSchedule", "StagedAscent", "build_objective"]
