"""The ``psiopt`` command line: list, train, compare, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from ..optim.registry import REGISTRY, list_optimizers
from .data import DATASETS, DataError, is_available
from .models import list_models
from .recipes import RECIPES
from .train import (
    INITS,
    MAX_SEED,
    RunConfig,
    RunError,
    check_run_dir,
    read_run_config,
    run_identity,
    setting_changes,
    train,
    train_spawned,
)


class UsageError(Exception):
    """A user error: reported as one line, exit status 2."""


#: errors that are the user's (bad flag, missing or malformed data, run directory mismatch):
#: one line, exit status 2; anything else is a bug and keeps its traceback
USER_ERRORS = (UsageError, DataError, RunError)
#: flags a recipe may fill in, with the value when neither the user nor a recipe sets them
DEFAULTS = {"dataset": "synthetic", "model": "mlp-bn", "epochs": 1, "batch_size": 128,
            "milestones": None, "gamma": 0.1, "init": "default", "subset": None, "seeds": 1,
            "optimizers": None, "threads": 1, "grouping": None, "model_kwarg": None,
            "validation": None, "exact_norms": False, "device": "cpu", "amp": "none",
            "channels_last": False}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _choice(kind: str, value: str, valid) -> str:
    if value not in valid:
        raise UsageError(f"unknown {kind} {value!r}; choose from {', '.join(valid)}")
    return value


def _optimizer(name: str) -> str:
    """A registered optimizer, or ``<inner>+<policy>[+project]`` / ``muon``
    (:mod:`psiopt.experiments.wrapped`); one line naming the choices otherwise."""
    from . import wrapped

    try:
        if wrapped.parse(name) is not None:
            return name
    except ValueError as e:
        raise UsageError(str(e)) from None
    if name not in list_optimizers():
        raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(list_optimizers())}, "
                         f"or <inner>+<policy>[+project] with inner {', '.join(wrapped.INNERS)} "
                         f"and policy {', '.join(wrapped.POLICIES)}, or muon")
    return name


def _number(text: str):
    """``0.1`` → 0.1, ``0.9,0.99`` → (0.9, 0.99), ``true``/``false`` → bool, ``16`` → 16."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    parts = [int(p) if p.strip().lstrip("-").isdigit() else float(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _pairs(flag: str, items) -> dict:
    """``["key=value", ...]`` of a repeated flag as ``{key: number or bool}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{flag} takes key=value, got {item!r}")
        try:
            out[key.replace("-", "_")] = _number(value)
        except ValueError:
            raise UsageError(f"{flag} {key}: {value!r} is not a number or true/false") from None
    return out


def _hyper(args) -> dict:
    hyper = {key: getattr(args, key) for key in
             ("lr", "invariant_lr", "weight_decay", "invariant_weight_decay", "momentum")
             if getattr(args, key) is not None}
    return {**hyper, **_pairs("--set", args.set)}


def _milestones(text: str | None) -> list[int]:
    try:
        return [int(m) for m in text.split(",")] if text else []
    except ValueError:
        raise UsageError(f"--milestones takes epochs like 60,120,160, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="default: synthetic")
    p.add_argument("--model", default=None, help="default: mlp-bn")
    p.add_argument("--epochs", type=int, default=None, help="default: 1")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128")
    p.add_argument("--subset", type=int, default=None, help="train on the first N samples")
    p.add_argument("--validation", type=int, default=None,
                   help="hold out the last N training samples and evaluate on them, not on the "
                        "test set (metrics say val_acc)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--fallback-dataset", default=None,
                   help="dataset to use when --dataset is not installed")
    p.add_argument("--lr", type=float, help="learning rate of every group")
    p.add_argument("--invariant-lr", type=float, help="learning rate of invariant groups only")
    p.add_argument("--weight-decay", type=float, help="L2 on non-invariant parameters")
    p.add_argument("--invariant-weight-decay", type=float, help="L2 on invariant parameters")
    p.add_argument("--momentum", type=float)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other optimizer hyperparameter, e.g. --set betas=0.9,0.99")
    p.add_argument("--milestones", default=None, help="epochs where lr is multiplied by --gamma")
    p.add_argument("--gamma", type=float, default=None, help="default: 0.1")
    p.add_argument("--init", default=None, help=f"one of {', '.join(INITS)}")
    p.add_argument("--grouping", default=None,
                   help="group every invariant weight as 'tensor' (Arora's PSGD) or 'channel'")
    p.add_argument("--exact-norms", action="store_true", default=None,
                   help="normalisation layers with eps·‖w‖² (Arora eq. 8): exactly invariant in "
                        "the weight that feeds them, however small its rows")
    p.add_argument("--model-kwarg", action="append", metavar="KEY=VALUE",
                   help="model option, e.g. --model-kwarg batch_norm=false (arora-vgg)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per run (default 1: honest timings on a shared machine)")
    p.add_argument("--device", default=None,
                   help="cpu (default), cuda or cuda:N: where the model, the optimizer and the "
                        "data (when it fits) live; with --nproc, rank r uses cuda:r (NCCL)")
    p.add_argument("--amp", default=None,
                   help="none (default) or bf16: forward passes under torch.autocast with "
                        "bfloat16, float32 parameters and optimizer")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="conv weights and input batches in torch.channels_last memory format "
                        "(faster convolutions on tensor-core GPUs, above all with --amp bf16); "
                        "refused for a model without 4-D conv weights")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")


def parser() -> Parser:
    top = Parser(prog="psiopt", description="Scale-invariant optimizers: train and compare.")
    sub = top.add_subparsers(dest="command", parser_class=Parser)
    ls = sub.add_parser("list", help="optimizers, models, datasets, recipes")
    ls.add_argument("--data-dir", default=None)
    t = sub.add_parser("train", help="train one model with one optimizer")
    _common(t)
    t.add_argument("--optimizer", default="sgd")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine (gloo on the CPU, NCCL and "
                        "one GPU per process with --device cuda; --batch-size is the global "
                        "batch); under torchrun, the number torchrun started")
    t.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="write a checkpoint after an epoch ending this long after the last one "
                        "(and at the last epoch); 0: every epoch (default 30)")
    t.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics of the global batch when --nproc > 1")
    c = sub.add_parser("compare", help="train every optimizer × seed, then write a report")
    _common(c)
    c.add_argument("--optimizers", default=None)
    c.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 1)")
    c.add_argument("--recipe", default=None, help=f"one of {', '.join(RECIPES)}")
    c.add_argument("--budget", default="small", help="recipe budget: small or full")
    r = sub.add_parser("report", help="regenerate summary.md and plots of a run directory")
    r.add_argument("directory")
    b = sub.add_parser("bench", help="step time against torch.optim; writes docs/performance.md")
    b.add_argument("--steps", type=int, default=60,
                   help="timed steps per optimizer in the optimizer-step, norm-policy and compile "
                        "sections (the whole-training-step section takes 12 of resnet20, 6 of "
                        "vgg16-bn)")
    b.add_argument("--sets", default=None,
                   help="comma-separated shapes of the optimizer-step, norm-policy and compile "
                        "sections: resnet56,vgg16-bn,mlp-ln (default all; the whole-training-step "
                        "section always runs resnet20 and vgg16-bn)")
    b.add_argument("--out", default="docs/performance.md", help="the report written (markdown)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    b.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N (CUDA: timed with CUDA events)")
    b.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: unchanged)")
    return top


def _check_bench_device(device: str) -> None:
    from .train import RunError, check_device

    try:
        check_device(device)  # (the harness's own check: cpu, cuda or cuda:N, here)
    except RunError as e:
        raise UsageError(f"--device {device!r}: {e}") from None


def cmd_list(data_dir=None) -> None:
    print("optimizers:")
    for name, spec in REGISTRY.items():
        print(f"  {name:12s} {spec.paper}")
    print("  <inner>+<policy>[+project]: torch.optim adamw, sgd or muon on psiopt.optimizer_groups "
          "with NormPolicy free, fixed, unit or equilibrium (e.g. adamw+fixed); muon: Muon + "
          "AdamW")
    print("models:\n  " + ", ".join(list_models()))
    print("datasets:")
    for name in DATASETS:
        print(f"  {name:15s} {'present' if is_available(name, data_dir) else 'not found'}")
    print("recipes (psiopt compare --recipe NAME [--budget small|full]):")
    for name, recipe in RECIPES.items():
        print(f"  {name:22s} {recipe['claim']}")


def _dataset(args) -> str:
    _choice("dataset", args.dataset, DATASETS)
    if not is_available(args.dataset, args.data_dir):
        if args.fallback_dataset:
            _choice("dataset", args.fallback_dataset, DATASETS)
            print(f"psiopt: {args.dataset} not found; using {args.fallback_dataset} instead "
                  "(for Fashion-MNIST: apt-get install dataset-fashion-mnist)", file=sys.stderr)
            return args.fallback_dataset
    return args.dataset


def _fill_defaults(args) -> None:
    for key, value in DEFAULTS.items():
        if getattr(args, key, value) is None:
            setattr(args, key, value)


def _config(args, optimizer: str, seed: int) -> RunConfig:
    config = RunConfig(dataset=_dataset(args), model=_choice("model", args.model, list_models()),
                       optimizer=optimizer, epochs=args.epochs, batch_size=args.batch_size,
                       seed=seed, subset=args.subset, validation=args.validation,
                       hyper=_hyper(args),
                       milestones=_milestones(args.milestones), gamma=args.gamma,
                       init=_choice("init", args.init, INITS), data_dir=args.data_dir,
                       threads=args.threads, grouping=args.grouping,
                       model_kwargs=_pairs("--model-kwarg", args.model_kwarg),
                       nproc=getattr(args, "nproc", None) or 1,
                       sync_bn=getattr(args, "sync_bn", False), exact_norms=bool(args.exact_norms),
                       device=args.device, amp=args.amp,
                       channels_last=bool(args.channels_last))
    try:
        config.validate()
    except RunError as e:
        raise UsageError(str(e)) from None
    return config


def _torchrun_world() -> int | None:
    """The number of processes when started by torchrun (``WORLD_SIZE`` and ``RANK`` set)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def cmd_train(args) -> None:
    _fill_defaults(args)
    world = _torchrun_world()
    if world is not None:
        if args.nproc not in (None, world):
            raise UsageError(f"--nproc {args.nproc} but torchrun started {world} processes")
        args.nproc = world
    config = _config(args, _optimizer(args.optimizer), args.seed)
    out = Path(args.out or f"runs/{config.dataset}-{config.model}-{config.optimizer}-s{args.seed}")
    if not args.checkpoint_seconds >= 0:
        raise UsageError(f"invalid --checkpoint-seconds {args.checkpoint_seconds} (must be >= 0)")
    kwargs = {"resume": args.resume, "progress": False if args.no_progress else None,
              "checkpoint_seconds": args.checkpoint_seconds}
    if world is not None and world > 1:
        from .train import process_group, run_device

        with process_group(config, run_device(config)):  # (torchrun: ranks from its variables)
            metrics = train(config, out, **kwargs)
        if int(os.environ["RANK"]):
            return
    elif config.nproc > 1:
        metrics = train_spawned(config, out, **kwargs)
    else:
        metrics = train(config, out, **kwargs)
    print(f"run directory: {out} ({len(metrics)} epochs)")


def _apply_recipe(args) -> tuple[dict, dict | None]:
    """Fill in the recipe's settings for every flag the user did not give (theirs win); return
    the recipe's variants (``{name: flags}``) and its lr selection (``None`` when it has none or
    the user gave ``--lr``)."""
    recipe = RECIPES[_choice("recipe", args.recipe, list(RECIPES))]
    preset = recipe[_choice("budget", args.budget, ["small", "full"])]
    select = recipe.get("select", {}).get(args.budget)
    if select and args.lr is not None:
        print(f"recipe {args.recipe}: --lr {args.lr:g} given, so no lr selection")
        select = None
    kept = []
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        elif getattr(args, key) != value:
            kept.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
    print(f"recipe {args.recipe} ({args.budget}): {recipe['claim']}"
          + (f"; your flags kept: {', '.join(kept)}" if kept else ""))
    return recipe["variants"], select


def _check_variants(args, variants: dict, given: set[str]) -> None:
    """Refuse a flag the user gave that a recipe's variant sets otherwise: the variant would
    replace it (a recipe fills in only the flags you did not give, and a variant is defined by
    its own)."""
    for variant, flags in variants.items():
        for key, value in flags.items():
            if key in given and getattr(args, key) != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"recipe {args.recipe}: its variant {variant!r} runs with {flag} "
                                 f"{value if not isinstance(value, list) else ' '.join(value)}, "
                                 f"which your {flag} would replace; drop the flag, or run compare "
                                 "without --recipe")


#: what a study recipe takes from the command line (``--device``/``--amp``/``--channels-last``
#: only as their defaults, refused with their own message)
STUDY_FLAGS = ("command", "recipe", "budget", "dataset", "model", "subset", "data_dir", "out",
               "threads", "no_progress", "device", "amp", "channels_last")


def cmd_study(args) -> None:
    """A recipe that is not a comparison of final accuracies (see ``studies``)."""
    from .studies import run_study

    recipe = RECIPES[args.recipe]
    params = dict(recipe[_choice("budget", args.budget, ["small", "full"])])
    for key in ("dataset", "model", "subset", "data_dir"):
        if getattr(args, key, None) is not None:
            params[key] = getattr(args, key)
    unset = vars(parser().parse_args(["compare"]))  # (every flag at its default)
    given = sorted("--" + key.replace("_", "-") for key, value in vars(args).items()
                   if key not in STUDY_FLAGS and value != unset.get(key))
    if given:
        raise UsageError(f"recipe {args.recipe} takes --dataset, --model, --subset, --data-dir, "
                         f"--threads and --out only (a study fixes its other settings), not "
                         f"{', '.join(given)}")
    if args.device not in (None, "cpu") or args.amp not in (None, "none") or args.channels_last:
        raise UsageError(f"recipe {args.recipe} is a study that runs on the CPU in full "
                         "precision: leave out --device and --amp (and --channels-last)")
    torch_threads(args.threads or 1)
    out = Path(args.out or f"runs/{args.recipe}")
    if (out / "summary.md").exists():
        raise RunError(f"{out} already holds this study; choose another --out")
    print(f"recipe {args.recipe} ({args.budget}): {recipe['claim']}")
    print(run_study(recipe["study"], params, out))


def torch_threads(n: int) -> None:
    import torch

    if n < 1:
        raise UsageError(f"invalid threads: {n} (must be at least 1)")
    torch.set_num_threads(n)


def cmd_compare(args) -> None:
    if args.recipe and "study" in RECIPES.get(args.recipe, {}):
        return cmd_study(args)
    given = {k for k, v in vars(args).items() if v is not None}  # (before the recipe fills in)
    variants, select = _apply_recipe(args) if args.recipe else ({}, None)
    _check_variants(args, variants, given)
    _fill_defaults(args)
    if not 1 <= args.seeds <= MAX_SEED + 1:
        raise UsageError(f"invalid --seeds: {args.seeds} (seeds 0..N-1: N must lie in "
                         f"1..{MAX_SEED + 1})")
    out = Path(args.out) if args.out else None
    selections, arms = {}, []  # lr selection runs, and (variant, configs) of each variant
    for variant, flags in (variants or {"": {}}).items():
        given = {k: getattr(args, k) for k in flags}
        for key, value in flags.items():
            setattr(args, key, value)
        if not args.optimizers:
            raise UsageError("--optimizers is required (or --recipe)")
        names = [_optimizer(n.strip()) for n in args.optimizers.split(",")]
        configs = [_config(args, name, seed) for name in names for seed in range(args.seeds)]
        if select:
            selections[variant] = _selection_runs(args, names, select)
        for key, value in given.items():
            setattr(args, key, value)
        arms.append((variant, configs))
    first = arms[0][1][0]
    out = out or Path(f"runs/compare-{args.recipe or first.dataset + '-' + first.model}")
    trials = [(out / v / SELECTION / name / f"lr{lr:g}", c)
              for v, runs in selections.items() for name, lr, c in runs]
    runs = [(out / v / c.optimizer / f"seed{c.seed}", c) for v, cs in arms for c in cs]
    # every run directory is checked before any is touched (with an lr selection, the main runs'
    # settings are known, and checked, once the selection has run)
    for directory, config in trials or runs:
        check_run_dir(config, directory, resume=True)
    for variant, configs in arms:
        _check_one_setting(out / variant, configs, [d for d, _ in runs])
    progress = False if args.no_progress else None
    for directory, config in trials:
        train(config, directory, resume=True, progress=progress)
    if selections:  # the runs again, each optimizer at its chosen lr (checked again)
        chosen = {v: _choose(out / v, select, trial) for v, trial in selections.items()}
        runs = [(out / v / c.optimizer / f"seed{c.seed}", _with_lr(c, chosen[v][c.optimizer]))
                for v, cs in arms for c in cs]
        for directory, config in runs:
            check_run_dir(config, directory, resume=True)
    for directory, config in runs:
        train(config, directory, resume=True, progress=progress)
    for variant, _ in arms:
        _report(out / variant)


#: subdirectory of a variant holding its lr selection runs (evaluated on a validation split)
SELECTION = "lr-selection"
#: settings in which the runs of one comparison (the rows of one summary) may differ
PER_RUN = ("optimizer", "seed", "hyper")


def _check_one_setting(directory: Path, configs: list[RunConfig], asked: list[Path]) -> None:
    """Raise :class:`RunError` when ``directory`` already holds runs (other optimizers or seeds
    than those asked for) with other settings than ``configs``: the rows of one summary share
    every setting but the optimizer, the seed and its hyperparameters (their epochs too: the runs
    asked for are continued to ``--epochs``, the others are not)."""
    mine = {k: v for k, v in run_identity(dataclasses.asdict(configs[0])).items() if k not in PER_RUN}
    mine["epochs"] = configs[0].epochs
    for path in sorted(directory.glob("*/seed*/config.json")):
        if path.parent in asked:  # continued with these settings: checked by check_run_dir
            continue
        recorded = read_run_config(path)
        theirs = {**run_identity(recorded), "epochs": recorded["epochs"]}
        differ = setting_changes(theirs, mine)
        if differ:
            raise RunError(f"{directory} already holds runs with other settings "
                           f"({path.parent.relative_to(directory)}: {', '.join(differ)}); the "
                           "runs of one comparison share them: use those settings or choose "
                           "another --out")


def _selection_runs(args, names: list[str], select: dict) -> list[tuple[str, float, RunConfig]]:
    """``(optimizer, lr, config)`` of the lr selection: each optimizer at each lr of the grid,
    seed 0, trained with a constant lr on ``select["subset"]`` samples and evaluated on the last
    ``select["validation"]`` training samples (held out).  The selection never trains longer or
    on more samples than the main runs (so ``--epochs 1 --subset 64`` makes a quick trial)."""
    keys = ("epochs", "subset", "validation", "milestones", "lr")
    saved = {k: getattr(args, k) for k in keys}
    args.epochs = min(select["epochs"], args.epochs)
    args.subset = min(n for n in (select["subset"], args.subset, math.inf) if n is not None)
    args.subset = None if args.subset == math.inf else args.subset
    args.validation = select["validation"]
    args.milestones = select.get("milestones")  # constant lr unless the protocol says otherwise
    try:
        runs = []
        for name in names:
            for lr in select["lrs"]:
                args.lr = lr
                runs.append((name, lr, _config(args, name, 0)))
        return runs
    finally:
        for key, value in saved.items():
            setattr(args, key, value)


def _choose(directory: Path, select: dict, runs) -> dict[str, float]:
    """Each optimizer's lr with the best final validation accuracy (the lowest validation loss
    for regression); diverged runs are left out, as Badrinarayanan et al. do.  Writes
    ``selection.json`` (read by the report)."""
    from .train import read_metrics

    table, chosen = {}, {}
    for name, lr, _ in runs:
        last = read_metrics(directory / SELECTION / name / f"lr{lr:g}")[-1]
        table.setdefault(name, {})[f"{lr:g}"] = last.get("val_acc", last.get("val_loss"))
        score = last.get("val_acc")
        score = -last["val_loss"] if score is None and last.get("val_loss") is not None else score
        if score is not None and (name not in chosen or score > chosen[name][1]):
            chosen[name] = (lr, score)
    failed = [name for name in table if name not in chosen]
    if failed:
        raise RunError(f"lr selection in {directory / SELECTION}: every lr diverged for "
                       f"{', '.join(failed)}")
    result = {name: lr for name, (lr, _) in chosen.items()}
    name, lr, config = runs[0]
    # as run: the training samples the trials used (fewer than asked on a smaller set)
    trial = read_run_config(directory / SELECTION / name / f"lr{lr:g}" / "config.json")
    subset = config.subset and (trial.get("samples") or {}).get("train", config.subset)
    protocol = {**select, "epochs": config.epochs, "subset": subset}
    record = {"protocol": protocol, "metric": "final validation accuracy (loss for regression)",
              "final_val": table, "chosen": result}
    from .report import write_atomically

    text = json.dumps(record, indent=2)
    write_atomically(directory / "selection.json", lambda tmp: tmp.write_text(text))
    print(f"lr selection ({directory}): " + ", ".join(f"{n} {lr:g}" for n, lr in result.items()))
    return result


def _with_lr(config: RunConfig, lr: float) -> RunConfig:
    return dataclasses.replace(config, hyper={**config.hyper, "lr": lr})


def _report(directory) -> None:
    from .report import write_report

    summary, plots, table = write_report(directory)
    print(table)
    print(f"summary: {summary}")
    for path in plots:
        print(f"plot: {path}")


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.command == "list":
            cmd_list(args.data_dir)
        elif args.command == "train":
            cmd_train(args)
        elif args.command == "compare":
            cmd_compare(args)
        elif args.command == "report":
            _report(args.directory)
        elif args.command == "bench":
            from .bench import SETS, run

            sets = [_choice("parameter set", n, list(SETS)) for n in args.sets.split(",")] \
                if args.sets else None
            _check_bench_device(args.device)
            if args.steps < 1:
                raise UsageError(f"invalid --steps {args.steps} (must be at least 1: the rounds "
                                 "timed per optimizer)")
            if args.threads is not None and args.threads < 1:
                raise UsageError(f"invalid --threads {args.threads} (must be at least 1)")
            run(args.out, steps=args.steps, sets=sets, compile_check=not args.no_compile,
                device=args.device, threads=args.threads)
        else:
            parser().print_help()
            return 2
    except USER_ERRORS as e:
        print(f"psiopt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
