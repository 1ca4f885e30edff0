"""Pruning in coefficient space: one-shot methods (:func:`prune`) and schedules stepped in training.

SP and IP go through the same code: every score is computed on ``coeff`` and every decision writes
``mask``; the two spaces differ only in the basis.
"""

from .oneshot import METHODS, prune
from .report import PruneReport
from .allocation import SCOPES
from .schedules import GMP, IMP, SET, RigL, Schedule

__all__ = ["prune", "PruneReport", "METHODS", "SCOPES", "Schedule", "GMP", "IMP", "RigL", "SET"]
