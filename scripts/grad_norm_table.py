"""Mean ± std over seeds of the gradient norm (``grad_norm``: with full batches, the full-batch
gradient norm before each step) at chosen epochs, per optimizer, for compare directories.

    python scripts/grad_norm_table.py runs/repro/yi-fig4/* --at 1 10 100 1000
"""

import argparse
import statistics
from pathlib import Path

from psiopt.experiments.report import load_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--at", type=int, nargs="+", default=[1, 10, 100, 1000])
    args = parser.parse_args()
    print("| run | optimizer | " + " | ".join(f"epoch {e}" for e in args.at) + " | diverged |")
    print("|---|---|" + "---|" * (len(args.at) + 1))
    for root in args.roots:
        for name, seeds in load_runs(root).items():
            cells = []
            for e in args.at:
                values = [m[e - 1]["grad_norm"] for _, m in seeds
                          if len(m) >= e and m[e - 1].get("grad_norm") is not None]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3g} ± {spread:.2g}" if values else "—")
            diverged = sum(bool(m[-1].get("diverged")) for _, m in seeds)
            print(f"| {root.name} | {name} | " + " | ".join(cells) + f" | {diverged}/{len(seeds)} |")


if __name__ == "__main__":
    main()
