"""What a study fixes before it runs: the baseline of every claim and the margin of every "at least as good"
(non-inferiority) comparison, in the measure's own units with the reason for its size. The study config states them
(``margins``, ``baselines``; each study kind's defaults are its pre-registration), the report prints them, and
nothing here is computed from results: a margin drawn from the baseline's own seed spread would change with the
data it judges, and a baseline picked by its test mean would shrink it further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from .stats import Test

Claims = list[tuple[str, str, list[Test]]]

# The load-CV margin every study shares: what "comparable balance" means in its units.
LOAD_CV_MARGIN = {"value": 0.1, "reason": "a tenth of the mean load per expert; the balancing-loss baseline's own "
                                          "load CV spans 0.19-0.43 across the committed studies, so a difference "
                                          "under 0.1 is small against what the baseline itself shows"}


@dataclass(frozen=True)
class Margin:
    """A non-inferiority margin: the method may fall short of its baseline by less than ``value`` (the measure's
    units); ``reason``: why that size, in one line."""

    value: float
    reason: str


@dataclass(frozen=True)
class Plan:
    """A study's pre-registration: ``margins`` by measure, ``baselines`` by claim (one per test of the claim)."""

    margins: dict[str, Margin]
    baselines: dict[str, tuple[str, ...]]
    router_kwargs: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)  # method -> (kwargs, reason)

    def claims(self, claims: Claims) -> Claims:
        """``claims`` with each test's baseline the one the plan names."""
        return [(number, text, [replace(t, baseline=b) for t, b in zip(tests, self.baselines[number])])
                if number in self.baselines else (number, text, tests) for number, text, tests in claims]

    def margin(self, measure: str) -> Margin:
        if measure not in self.margins:
            raise KeyError(f"no pre-registered margin for {measure!r}")
        return self.margins[measure]

    def lines(self, claims: Claims) -> list[str]:
        """The report's section: every claim's baseline(s) and every margin with its reason."""
        out = ["## Fixed before the runs (the study config)", "",
               "Baselines and non-inferiority margins come from the study config, not from the results:", ""]
        for number, text, tests in self.claims(claims):
            names = ", ".join(dict.fromkeys(f"`{t.baseline}`" for t in tests))
            out.append(f"- {'the preset check' if number == 'preset' else f'claim {number}'}: against {names}")
        out.append("")
        out += [f"- margin for `{measure}`: {m.value:g} ({m.reason})" for measure, m in self.margins.items()]
        if self.router_kwargs:
            out.append("")
            out += [f"- `{method}`'s router settings: " + ", ".join(f"{k} {v!r}" for k, v in kwargs.items())
                    + f" ({reason})" for method, (kwargs, reason) in self.router_kwargs.items()]
        return out + [""]


def _has_router(model: Mapping[str, Any]) -> bool:
    """Whether a model section has an MoE section with a router (a tower's counts)."""
    return any((key == "moe" and isinstance(v, Mapping) and bool(v.get("router")))
               or (isinstance(v, Mapping) and _has_router(v)) for key, v in model.items())


def make_plan(margins: Mapping[str, Any], baselines: Mapping[str, Any], claims: Claims,
              methods: Iterable[str], extra_parity: Iterable[str] = (), router_kwargs: Mapping[str, Any] = {},
              method_model: Callable[[str], Mapping[str, Any]] | None = None) -> Plan:
    """The plan from a study config's ``margins`` (measure -> ``{value, reason}``) and ``baselines`` (claim ->
    a method, or a list of one method per test of the claim), checked against the study's ``claims`` and
    ``methods``: every non-inferiority test (and every measure in ``extra_parity``, e.g. the preset check's) needs
    a positive margin with a reason; every baseline must be a method of the study; ``router_kwargs`` (method ->
    ``{kwargs, reason}``) name methods with a router (``method_model``: a method's model section) and say how the
    settings were chosen. Raises ConfigError."""
    from ..train.config import ConfigError

    methods = set(methods)
    parsed: dict[str, Margin] = {}
    for measure, spec in margins.items():
        if not isinstance(spec, Mapping) or set(spec) != {"value", "reason"}:
            raise ConfigError(f"study.margins.{measure}: expected {{value: <number>, reason: <why that size>}}, "
                              f"got {spec!r}")
        value, reason = spec["value"], spec["reason"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"study.margins.{measure}.value must be a positive number, got {value!r}")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError(f"study.margins.{measure}.reason must say why the margin has that size")
        parsed[measure] = Margin(float(value), reason.strip())
    by_number = {number: tests for number, _, tests in claims}
    resolved: dict[str, tuple[str, ...]] = {}
    for number, names in baselines.items():
        number = str(number)
        if number not in by_number:
            raise ConfigError(f"study.baselines: no claim {number!r} in this study (claims: {list(by_number)})")
        tests = by_number[number]
        names = [names] * len(tests) if isinstance(names, str) else list(names)
        if len(names) != len(tests) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"study.baselines.{number}: claim {number} has {len(tests)} comparison(s); name one "
                              f"method, or a list of {len(tests)}, got {baselines[number]!r}")
        unknown = [n for n in names if n not in methods]
        if unknown:
            raise ConfigError(f"study.baselines.{number}: {unknown} is not a method of this study "
                              f"(choose from {sorted(methods)})")
        resolved[number] = tuple(names)
    needed = [t.measure for tests in by_number.values() for t in tests if t.parity] + list(extra_parity)
    missing = sorted(set(needed) - set(parsed))
    if missing:
        raise ConfigError(f"study.margins: the non-inferiority comparisons of {missing} need a margin fixed before "
                          "the runs: {value: <in the measure's units>, reason: <why that size>}")
    settings = {}
    for method, spec in router_kwargs.items():
        if not isinstance(spec, Mapping) or set(spec) != {"kwargs", "reason"} or not isinstance(spec["kwargs"],
                                                                                                Mapping):
            raise ConfigError(f"study.router_kwargs.{method}: expected {{kwargs: {{name: value}}, reason: <how they "
                              f"were chosen>}}, got {spec!r}")
        if method not in methods:
            raise ConfigError(f"study.router_kwargs: {method!r} is not a method of this study's kind "
                              f"(choose from {sorted(methods)})")
        if method_model is not None and not _has_router(method_model(method)):
            raise ConfigError(f"study.router_kwargs.{method}: {method} has no MoE router to set")
        if not isinstance(spec["reason"], str) or not spec["reason"].strip():
            raise ConfigError(f"study.router_kwargs.{method}.reason must say how the settings were chosen")
        settings[method] = (dict(spec["kwargs"]), spec["reason"].strip())
    return Plan(parsed, resolved, settings)
