"""The shape of the code that issue 39 set targets for (docs/architecture.md): the trainer's loop and class sizes
in ermoe/train, how often the trainer names the whole config, the registration mechanisms, the source line count.
Reads the source only (ast); prints a markdown table.

    python benchmarks/code_shape.py [--src src/ermoe]
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

LOOP = ("fit", "_log_window", "_train_step", "_micro_step", "_update", "checkpoint")


def lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def measure(src: Path) -> dict[str, object]:
    files = sorted(src.rglob("*.py"))
    trainer = ast.parse((src / "train" / "trainer.py").read_text())
    cls = next(n for n in trainer.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = {n.name: lines(n) for n in cls.body if isinstance(n, ast.FunctionDef)}
    classes = {}
    for path in sorted((src / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes[f"{path.name}:{node.name}"] = lines(node)
    text = {p: p.read_text() for p in files}
    registries = sorted({m for t in text.values() for m in re.findall(r"Registry(?:\[[^\]]*\])?\(\"([^\"]+)\"\)", t)})
    dict_registries = [f"{p.relative_to(src)}:{m}" for p, t in text.items()
                       for m in re.findall(r"^(_?[A-Z_]+): dict\[str, [A-Za-z]*(?:Entry|type)", t, re.M)]
    trainer_text = (src / "train" / "trainer.py").read_text()
    class_text = ast.get_source_segment(trainer_text, cls)
    return {"trainer loop (lines)": sum(methods.get(m, 0) for m in LOOP),
            "Trainer class (lines)": lines(cls), "Trainer methods": len(methods),
            "largest class in train/": max(classes.items(), key=lambda kv: kv[1]),
            "`cfg` mentions in trainer.py (in the Trainer class)":
                f"{len(re.findall(r'[.]?cfg[.]', trainer_text))} ({len(re.findall(r'cfg[.]', class_text))})",
            "registries (ermoe.registry.Registry)": ", ".join(registries),
            "other registration dicts": ", ".join(dict_registries) or "none",
            "src lines": sum(t.count("\n") for t in text.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src" / "ermoe"))
    args = parser.parse_args()
    print("| measure | value |\n|---|---|")
    for key, value in measure(Path(args.src)).items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
