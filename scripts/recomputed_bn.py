"""Test accuracy of finished runs in eval mode and with BatchNorm statistics recomputed on the
training set (``torch.optim.swa_utils.update_bn``), for runs made before the harness recorded it.
Reads the run directories, changes nothing.

    python scripts/recomputed_bn.py runs/repro/yi-table1
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from psiopt.experiments.data import batches
from psiopt.experiments.train import RunConfig, build, evaluate, read_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    print("| run | eval-mode test acc (%) | BN recomputed (%) |\n|---|---|---|")
    for root in args.roots:
        for path in sorted(root.glob("**/checkpoint.pt")):
            recorded = json.loads((path.parent / "config.json").read_text())
            config = RunConfig(**{k: v for k, v in recorded.items() if k in fields})
            data, model, _, _ = build(config)
            model.load_state_dict(read_checkpoint(path, config)["model"])
            _, eval_acc = evaluate(model, data.test_x, data.test_y, regression=False)
            update_bn(batches(data.train_x, data.train_y, 1024), model)
            _, fresh_acc = evaluate(model, data.test_x, data.test_y, regression=False)
            print(f"| {path.parent.relative_to(root)} | {100 * eval_acc:.2f} | {100 * fresh_acc:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
