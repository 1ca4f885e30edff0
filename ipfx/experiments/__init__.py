"""The experiment engine behind ``ipfx compare`` and ``ipfx demo``: data, models, runs, results."""

from .data import DATASETS, Dataset, load_dataset
from .engine import METHODS, IMPPlan, RunSpec, evaluate, imp_plan, run
from .models import BUILTIN, build_model
from .report import markdown_table, paired_tables, plot
from .store import ResultStore
from .sweep import sweep

__all__ = ["DATASETS", "Dataset", "load_dataset", "METHODS", "RunSpec", "IMPPlan", "imp_plan", "run", "evaluate",
           "BUILTIN", "build_model", "markdown_table", "paired_tables", "plot", "ResultStore", "sweep"]
