"""Run the benchmarks: `python -m benchmarks [--only NAME]`, writing runs/bench.json."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import benchmarks


def _registry() -> dict[str, object]:
    figures: dict[str, object] = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if info.name.startswith("bench_"):
            figures.update(importlib.import_module(f"benchmarks.{info.name}").BENCHES)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="run only these figures: names or name prefixes, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("runs/bench.json"))
    args = parser.parse_args(argv)
    registry = _registry()
    names = list(registry)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(name.startswith(w) for name in registry)]
        if unknown:
            print(f"bench: unknown figure {unknown[0]!r}; known: {', '.join(sorted(registry))}", file=sys.stderr)
            return 2
        names = [name for name in registry if any(name.startswith(w) for w in wanted)]
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in names:
        figure = registry[name]()
        for key, value in figure.details.items():
            print(f"  {name}: {key} = {value}")
        print(f"bench: {name}: {figure.value:.4g} {figure.unit} (goal {figure.goal})", flush=True)
        results[name] = {"value": figure.value, "unit": figure.unit, "goal": figure.goal}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
