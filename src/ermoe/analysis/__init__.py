"""Diagnostics of routing layers (load, specialisation, homogeneity, stability, basis geometry) and their figures."""

from .diagnostics import (assignment_matrix, assignments, basis_geometry, chance_changed_share, changed_share,
                          entropy_bits, evaluate_classifier, homogeneity, mutual_information, probe_load, probe_routing)
from .report import draw_figures, layers_table

__all__ = ["assignment_matrix", "assignments", "chance_changed_share", "basis_geometry", "changed_share", "entropy_bits", "evaluate_classifier", "homogeneity",
           "mutual_information", "probe_load", "probe_routing", "draw_figures", "layers_table"]
