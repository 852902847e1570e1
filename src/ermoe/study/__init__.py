"""The comparison study: every method under one budget, several seeds, a generated report."""

from .methods import DEFAULT_METHODS, METHODS, method_model
from .report import aggregate, verdicts, write_report
from .kinds import KINDS, StudyKind, study_kind
from .runner import StudyConfig, kind_of, load_study_config, run_study

__all__ = ["DEFAULT_METHODS", "KINDS", "METHODS", "StudyConfig", "StudyKind", "aggregate", "kind_of", "load_study_config",
           "method_model", "run_study", "study_kind", "verdicts", "write_report"]
