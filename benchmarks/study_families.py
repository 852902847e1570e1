"""Which verdicts of a written study report move under the two-family rule (docs/study.md, "Verdicts": the paper
methods' comparisons one family, the variants' another, each with its own Holm; a non-inferiority comparison ranked
by its test against the margin), recomputed from the report's own evidence lines, for the reports whose run records
are not kept (a report whose records are kept is regenerated instead: docs/records/README.md).

The evidence lines print each paper comparison's difference and standard error to 3 significant digits and its
p-value to 3 decimals ("< 0.001" is read as 0.0005): a recomputed Holm p within 10% of 0.05 is flagged "(near the
level)". The variants' family cannot be recomputed from a report (their rows are not printed); only the paper
methods' verdicts are.

    python benchmarks/study_families.py docs/results.md docs/results_stem.md ...
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ermoe.study.stats import Paired, holm, interval, margin_p

ALPHA = 0.05
LOWER_IS_BETTER = ("load_cv", "homogeneity", "probe_changed", "mae")
CLAIM = re.compile(r"^\*\*Claim (\w+): .*Verdict: (.*)\.\*\*$")
ROW = re.compile(r"^- `(?P<method>[\w.]+)` (?P<measure>\w+) \S+ vs (?:[\d.]+ x )?`\w+` \S+: paired difference "
                 r"(?P<diff>\S+) over (?P<n>\d+) seeds, se (?P<se>\S+) .*?, p (?P<p>< 0\.001|[\d.]+), Holm "
                 r"(?:< 0\.001|[\d.]+)(?P<rest>.*): \*\*(?P<outcome>\w+)\*\*$")
MARGIN = re.compile(r"; margin (?P<margin>[\d.e+-]+) \(pre-registered\)")


@dataclass
class Row:
    method: str
    measure: str
    stat: Paired
    margin: float | None
    not_compared: bool
    outcome: str

    @property
    def sign(self) -> float:
        return -1.0 if any(k in self.measure for k in LOWER_IS_BETTER) else 1.0


def parse(report: Path) -> list[tuple[str, str, list[Row]]]:
    """(claim, its printed verdict, its paper rows) for each claim of a report."""
    claims: list[tuple[str, str, list[Row]]] = []
    for line in report.read_text().splitlines():
        if m := CLAIM.match(line):
            claims.append((m.group(1), m.group(2), []))
        elif claims and (m := ROW.match(line)):
            diff, se, n = float(m["diff"]), float(m["se"]), int(m["n"])
            p = 0.0005 if m["p"].startswith("<") else float(m["p"])
            margin = MARGIN.search(m["rest"])
            stat = Paired(diff, se, diff, diff, p, float(n - 1), n, se)
            claims[-1][2].append(Row(m["method"], m["measure"], stat, float(margin["margin"]) if margin else None,
                                     "not compared" in m["rest"], m["outcome"]))
    return claims


def regrade(rows: list[Row]) -> tuple[dict[str, str], list[float]]:
    """Each paper method's verdict under the two-family rule, and the rows' Holm p-values."""
    tested = [margin_p(r.stat, r.margin, r.sign) if r.margin is not None else r.stat.p for r in rows]
    adjusted = holm(tested)
    outcomes: dict[str, list[str]] = {}
    for row, p in zip(rows, adjusted):
        if row.not_compared:
            outcome = "inconclusive"
        elif row.margin is not None:
            low, high = interval(row.stat, 1 - ALPHA / len(rows))
            high = high if row.sign > 0 else -low
            outcome = "supported" if p < ALPHA else "contradicted" if high < -row.margin else "inconclusive"
        else:
            outcome = ("supported" if row.sign * row.stat.diff > 0 else "contradicted") if p < ALPHA else \
                "inconclusive"
        outcomes.setdefault(row.method, []).append(outcome)
    verdict = {m: "contradicted" if "contradicted" in o else "supported" if all(x == "supported" for x in o)
               else "inconclusive" for m, o in outcomes.items()}
    return verdict, adjusted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for report in args.reports:
        print(f"{report}:")
        for claim, printed, rows in parse(report):
            if not rows:
                print(f"  claim {claim}: no paper comparison printed ({printed})")
                continue
            verdict, adjusted = regrade(rows)
            now = ", ".join(f"`{m}` {v}" for m, v in verdict.items())
            near = any(p is not None and abs(p - ALPHA) < 0.1 * ALPHA for p in adjusted)
            moved = "unchanged" if now == printed else f"MOVED from: {printed}"
            print(f"  claim {claim}: {now} ({moved}){' (near the level)' if near else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
