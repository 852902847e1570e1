"""Issue 41: the prose says no more than its tests. Every paragraph of README.md and docs/*.md (the generated reports
aside) that compares methods with a comparative word ("flatter", "better", "below", "beat", "more accurate", ...)
cites what supports it: a verdict or a test (claim N, Holm p, an interval, supported / inconclusive / contradicted,
significant), or says it is not one ("one run", "not a tested comparison"), or is the papers' own claim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMPARATIVE = re.compile(r"\b(flatter|better|worse|beats?|outperform\w*|more accurate|less accurate|more balanced|"
                         r"less balanced|more stable|less stable|more specialised|less specialised|"
                         r"(below|above)(?=\s+(?!which\b)(?!chance\b)(?!1:)\w))", re.I)  # (not "the table below.")
METHODS = re.compile(r"\b(ERMoE|EMoE|Switch|softmax gate|V-MoE|expert choice|loss-free|dense FFN|plain CNN|"
                     r"dense towers?|bag of words|bag-of-words)\b")
CITES = re.compile(r"claims? \d|Holm|\bp [<=]?\s?0?\.\d|\bp < |\bCI\b|95%|interval|supported|contradicted|"
                   r"inconclusive|significant|not confirmed|paired|verdict|not (a )?tested|untested|Bonferroni|"
                   r"margin|one run|one seed|seed 0\b|(EMoE|ERMoE|the papers?) (reports?|claims?)", re.I)


def uncited_paragraphs(text: str) -> list[str]:
    """The paragraphs (code blocks, tables and headings aside) with a comparative sentence about methods and no
    citation."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    out = []
    for para in text.split("\n\n"):
        if para.lstrip().startswith(("|", "#")):
            continue
        flat = " ".join(para.split())
        sentences = re.split(r"(?<=[.;])\s+(?=[A-Z(*])", flat)
        if any(COMPARATIVE.search(s) and METHODS.search(s) for s in sentences) and not CITES.search(flat):
            out.append(flat)
    return out


def test_the_check_finds_an_uncited_comparison_and_accepts_a_cited_one():
    assert uncited_paragraphs("ERMoE's loads were flatter than Switch's (CV 0.39 against 0.73).")
    assert not uncited_paragraphs("ERMoE's loads were flatter than Switch's (CV 0.39 against 0.73, claim 2 "
                                  "supported).")
    assert not uncited_paragraphs("A cosine below which a second choice is dropped; ERMoE routes.\n\n| ERMoE | "
                                  "better |")
    assert not uncited_paragraphs("Switch, the augmentation above), and the table below.")


def test_every_comparison_of_methods_in_the_prose_cites_its_test():
    files = [ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md"))
                                    if not p.name.startswith("results")]
    problems = [f"{path.relative_to(ROOT)}: {para[:200]}" for path in files
                for para in uncited_paragraphs(path.read_text())]
    assert not problems, "comparisons without the test or verdict behind them:\n" + "\n".join(problems)
