"""Which study a config asks for, by its training task: what it compares (the method table and the default budget)
and how its report is written. ``ermoe study`` runs the image-classification study; a study config whose
``train.task`` is ``brain_age`` runs the brain-age study (configs/study_brainage.yaml), ``retrieval`` the retrieval
study (configs/study_retrieval.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import Registry
from . import brain, retrieval
from .methods import METHODS, method_model
from .plan import Claims, Plan, make_plan
from .report import CLAIMS, PRESET


@dataclass(frozen=True)
class StudyKind:
    """A study of one task: its methods (name -> role, description, model overrides), how a method turns the base
    model section into its own, its defaults (StudyConfig keys, ``train`` replacing the image study's budget
    whole; ``None``: StudyConfig's own), the quick version's overrides (``None``: the image study's), whether runs
    get few-shot probes, the measure logged per run, and the report writer (``None``: the image study's).
    ``claims``: what its report decides (the baselines and margins of its plan are checked against them)."""

    task: str  # the training task it studies, and the name it is registered under
    methods: dict[str, tuple[str, str, dict[str, Any]]]
    method_model: Callable[[str, dict[str, Any]], dict[str, Any]]
    claims: Claims
    defaults: dict[str, Any] | None = None
    quick: dict[str, Any] | None = None
    fewshot: bool = True
    headline: tuple[str, str] = ("test_top1", "top-1 {:.4f}")
    write_report: Callable[..., Any] | None = None

    @property
    def name(self) -> str:
        return self.task


# The studies by task (ermoe.registry, as routers, tasks and datasets): a new task's study registers one more
KINDS: Registry[StudyKind] = Registry("study kind")
KINDS.register(StudyKind("classification", METHODS, method_model, [*CLAIMS, PRESET]))
KINDS.register(StudyKind("brain_age", brain.BRAIN_METHODS, brain.brain_method_model, brain.BRAIN_CLAIMS,
                         defaults=brain.BRAIN_STUDY, quick=brain.BRAIN_QUICK, fewshot=False,
                         headline=("test_mae", "MAE {:.3f} years"), write_report=brain.write_brain_report))
KINDS.register(StudyKind("retrieval", retrieval.RETRIEVAL_METHODS, retrieval.retrieval_method_model,
                         retrieval.RETRIEVAL_CLAIMS, defaults=retrieval.RETRIEVAL_STUDY,
                         quick=retrieval.RETRIEVAL_QUICK, fewshot=False,
                         headline=("test_rsum", "RSUM {:.1f}"), write_report=retrieval.write_retrieval_report))


def study_kind(task: str) -> StudyKind:
    if task not in KINDS:
        from ..train.config import ConfigError
        raise ConfigError(f"train.task: no study is defined for task {task!r}; studies exist for {list(KINDS)}")
    return KINDS[task]


def study_plan(cfg) -> Plan:
    """A study config's pre-registration (its ``margins`` and ``baselines``) checked against its kind's claims."""
    kind = study_kind(cfg.train.get("task", "classification"))
    return make_plan(cfg.margins, cfg.baselines, kind.claims, kind.methods, router_kwargs=cfg.router_kwargs,
                     method_model=lambda name: kind.method_model(name, cfg.train.get("model", {})))
