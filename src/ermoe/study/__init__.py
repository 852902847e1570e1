"""The comparison study: every method under one budget, several seeds, a generated report."""

from .methods import DEFAULT_METHODS, METHODS, method_model
from .report import aggregate, verdicts, write_report
from .runner import StudyConfig, load_study_config, run_study

__all__ = ["DEFAULT_METHODS", "METHODS", "StudyConfig", "aggregate", "load_study_config", "method_model", "run_study", "verdicts",
           "write_report"]
