"""One command for a GPU machine (``make gpu-check`` or ``scripts/gpu_check.sh``): check a psiopt
install on CUDA and write one report.

Steps, each with a time cap, all within ten minutes on one H100:

1. the environment: the modules and the C compiler the steps need (:func:`missing_prerequisites`),
   torch with CUDA and a GPU, or a one-line failure (nothing is skipped); the steps import this
   checkout's psiopt (``src`` first on the path);
2. the optional GPU extra of ``pyproject.toml`` (``--extra``, default ``gpu``), installed with
   pip when it exists and is not installed yet (the CUDA build of torch is never touched);
3. the CUDA tests (``tests/test_cuda.py`` and ``tests/test_device.py``) with ``pytest -rs``:
   a CUDA test that is skipped fails the check, as does a run with no CUDA test passed; the only
   skips allowed are listed in :data:`ALLOWED_SKIPS` (tests for a machine without CUDA, and the
   two-GPU test on a one-GPU machine) and the report names each of them;
4. ``psiopt bench --device cuda`` on resnet56 (a short run, no ``torch.compile`` section);
5. ``psiopt train --device cuda``: two epochs of resnet20 on synthetic data (into
   ``<workdir>/train``, an earlier check's run there removed first);
6. the report (``--report``, default ``gpu-report.md``): device, versions, every step's result,
   the test summary with every skip and its reason, the bench tables and the training metrics.

Exit status 0 only when every step passed.  ``--dry-run`` prints the steps and exits 0 without
running anything (no GPU needed).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = ("tests/test_cuda.py", "tests/test_device.py")
#: total wall-clock budget (seconds) and each step's cap within it
BUDGET_S = 570
CAPS_S = {"install": 120, "tests": 360, "bench": 180, "train": 120}
#: seconds a step interrupted at its cap has to stop (pytest writes its junit file) before a kill
INTERRUPT_GRACE_S = 15
#: skips that are not CUDA tests being skipped: (reason pattern, condition on the GPU count)
ALLOWED_SKIPS = (
    (r"a machine without CUDA", lambda gpus: gpus >= 1),  # CPU-only tests of test_device.py
    (r"needs two CUDA devices", lambda gpus: gpus < 2),  # the NCCL test on a one-GPU machine
)


class CheckFailed(Exception):
    """A step failed: its message is the report's and the one line printed."""


@dataclass
class Step:
    name: str
    ok: bool
    summary: str
    seconds: float = 0.0
    details: str = ""


@dataclass
class TestResults:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (test, reason)

    def judge(self, gpus: int) -> tuple[bool, list[str], list[str]]:
        """Whether the run passes: no failure or error, at least one test passed, and every skip
        allowed for ``gpus`` GPUs.  Returns it with the forbidden and the allowed skips."""
        forbidden, allowed = [], []
        for test, reason in self.skipped:
            ok = any(re.search(p, reason) and cond(gpus) for p, cond in ALLOWED_SKIPS)
            (allowed if ok else forbidden).append(f"{test}: {reason}")
        return (not self.failed and not forbidden and bool(self.passed)), forbidden, allowed


def parse_junit(path: Path) -> TestResults:
    """The outcome of every test case of pytest's ``--junitxml`` file."""
    results = TestResults()
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        skip = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            results.failed.append(test)
        elif skip is not None:
            reason = skip.get("message", "") or (skip.text or "")
            results.skipped.append((test, reason.strip()))
        else:
            results.passed.append(test)
    return results


def _run(command: list[str], cap: float, log: Path, **extra_env: str) -> tuple[int | None, str]:
    """Run ``command`` in the repository with a time cap, importing this checkout's psiopt
    (``src`` first on ``PYTHONPATH``); its output goes to ``log``.  Past the cap it is
    interrupted (SIGINT, then killed after :data:`INTERRUPT_GRACE_S`).  Returns the exit status
    (``None`` on time-out) and the output's last 40 lines."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra_env}
    with log.open("w") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=max(cap, 1))
        except subprocess.TimeoutExpired:  # interrupted as by Ctrl-C first: pytest then writes
            rc = None                      # the junit of the tests that finished
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return rc, tail


def environment() -> dict:
    """Versions and the device; ``cuda`` False (with ``why``) where CUDA cannot be used."""
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python_executable": sys.executable, "commit": _git("rev-parse", "--short", "HEAD"),
           "uncommitted": bool(_git("status", "--porcelain", "--untracked-files=no"))}
    for dist in ("psiopt", "triton", "pytorch-triton"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    import psiopt

    env["psiopt_file"] = psiopt.__file__  # (this checkout's: see main)
    env["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn": torch.backends.cudnn.allow_tf32,
                   "float32_matmul_precision": torch.get_float32_matmul_precision()}
    env["missing"] = missing_prerequisites()
    if torch.version.cuda is None:
        env["cuda"], env["why"] = False, (
            f"torch {torch.__version__} of {sys.executable} is a CPU build (torch.version.cuda is "
            "None): install a CUDA build of torch, or name another interpreter (PYTHON=... "
            "scripts/gpu_check.sh; it takes .venv/bin/python where there is one)")
    elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        env["cuda"], env["why"] = False, (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}; "
            "is the driver loaded? see nvidia-smi)")
    else:
        env["cuda"], env["gpus"] = True, torch.cuda.device_count()
        env["gpu"] = [torch.cuda.get_device_name(i) for i in range(env["gpus"])]
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["driver"] = _nvidia_smi()
    return env


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


#: modules the steps import (the tests, the harness: numpy, tqdm, matplotlib for ``compare``)
PREREQUISITE_MODULES = ("pytest", "numpy", "tqdm", "matplotlib")


def missing_prerequisites() -> list[str]:
    """What the steps need and this machine lacks, checked before anything runs (a machine
    without network cannot install them on the way): the modules of
    :data:`PREREQUISITE_MODULES`, and a C compiler with Python's headers (Triton builds its
    launcher with them at the first kernel; psiopt's CPU kernels too)."""
    import sysconfig

    missing = [f"the module {m} (pip install {m})" for m in PREREQUISITE_MODULES
               if importlib.util.find_spec(m) is None]
    if not any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang")):
        missing.append("a C compiler (cc, gcc or clang; Triton builds its launcher with it)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        missing.append(f"Python's headers (Python.h in {sysconfig.get_paths()['include']}; "
                       "e.g. apt install python3-dev)")
    return missing


def extra_requirements(extra: str) -> list[str] | None:
    """The requirements of ``extra`` in ``pyproject.toml``, ``None`` where it has no such extra."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib  # Python 3.11
    except ModuleNotFoundError:  # Python 3.10: the extras are one-line lists of strings
        section = text.split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
        found = re.search(rf"^{re.escape(extra)}\s*=\s*(\[.*\])\s*$", section, flags=re.M)
        return ast.literal_eval(found.group(1)) if found else None
    project = tomllib.loads(text)["project"]
    return project.get("optional-dependencies", {}).get(extra)


def _installed(requirement: str) -> bool:
    """Whether ``requirement``'s distribution is installed in a version it allows, or a module of
    its name importable (torch's nightly builds bring triton as the distribution
    ``pytorch-triton``: a pip install of ``triton`` there would replace it, or fail on a machine
    without network)."""
    name = re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(name.replace("-", "_")) is not None
    try:  # the version asked for (pip's own parser; where it is missing, any version)
        from packaging.requirements import Requirement
    except ImportError:
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def commands(python: str, work: Path, device: str, tests=TEST_FILES) -> dict[str, list[str]]:
    """The commands of the test, bench and train steps."""
    cli = [python, "-m", "psiopt.experiments.cli"]
    return {
        "tests": [python, "-m", "pytest", "-rs", "-v", "-p", "no:cacheprovider",
                  f"--junitxml={work / 'junit.xml'}", *tests],
        "bench": [*cli, "bench", "--device", device, "--sets", "resnet56", "--steps", "20",
                  "--no-compile", "--out", str(work / "bench.md")],
        "train": [*cli, "train", "--device", device, "--dataset", "synthetic", "--model", "resnet20",
                  "--optimizer", "psi-sgdm", "--epochs", "2", "--subset", "2048", "--batch-size",
                  "128", "--no-progress", "--out", str(work / "train")],
    }


def run_check(args) -> int:
    python, work, start = sys.executable, Path(args.workdir).resolve(), time.monotonic()
    plan = commands(python, work, args.device, args.tests.split(","))
    if args.dry_run:
        print(f"gpu-check: dry run (report {args.report}, work directory {work})")
        print(f"1. environment: torch with CUDA and a GPU on {args.device}, or fail")
        print(f"2. install the extra {args.extra!r} of pyproject.toml when it exists and is missing: "
              f"{extra_requirements(args.extra)}")
        for i, (name, command) in enumerate(plan.items(), 3):
            print(f"{i}. {name} (cap {CAPS_S[name]} s): {shlex.join(command)}")
        print(f"6. write the report; exit 1 if any step failed or any CUDA test was skipped "
              f"(allowed skips: {', '.join(p for p, _ in ALLOWED_SKIPS)})")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    env = environment()
    if env["missing"]:
        steps.append(Step("environment", False, f"prerequisites missing: {'; '.join(env['missing'])}"))
        return finish(args, env, steps, work)
    if not env["cuda"]:
        steps.append(Step("environment", False, f"CUDA is not available: {env['why']}"))
        return finish(args, env, steps, work)
    index = args.device.partition(":")[2]  # the tests' "cuda" is the GPU --device names
    if index and int(index) >= env["gpus"]:
        steps.append(Step("environment", False, f"--device {args.device}: this process sees "
                          f"{env['gpus']} GPU(s) (cuda:0 to cuda:{env['gpus'] - 1})"))
        return finish(args, env, steps, work)
    steps.append(Step("environment", True, f"{env['gpus']} GPU(s): {', '.join(env['gpu'])}"))

    def remaining(name):
        return min(CAPS_S[name], BUDGET_S - (time.monotonic() - start))

    steps.append(install_extra(args, python, work, remaining("install")))
    write_report(args, env, steps, work)
    t = time.monotonic()
    (work / "junit.xml").unlink(missing_ok=True)  # a stale one is no result
    rc, tail = _run(plan["tests"], remaining("tests"), work / "tests.log",
                    **({"CUDA_VISIBLE_DEVICES": visible_device(index)} if index else {}))
    steps.append(judge_tests(rc, tail, work / "junit.xml", 1 if index else env["gpus"],
                             time.monotonic() - t))
    write_report(args, env, steps, work)  # (each step's result kept should a later one hang)
    for name in ("bench", "train"):
        t = time.monotonic()
        cap = remaining(name)
        if cap < 10:
            steps.append(Step(name, False, f"not run: the {BUDGET_S} s budget is spent"))
            continue
        if name == "train":  # (a run left by an earlier check: train would refuse its --out)
            shutil.rmtree(work / "train", ignore_errors=True)
        rc, tail = _run(plan[name], cap, work / f"{name}.log")
        ok = rc == 0
        summary = ("passed" if ok else f"timed out after {cap:.0f} s" if rc is None
                   else f"failed (exit {rc})")
        why = judge_training(work / "train" / "metrics.jsonl") if ok and name == "train" else None
        if why:
            ok, summary = False, f"exit 0, but {why}"
        steps.append(Step(name, ok, summary, time.monotonic() - t, "" if ok else tail))
        write_report(args, env, steps, work)
    return finish(args, env, steps, work)


def install_extra(args, python: str, work: Path, cap: float) -> Step:
    requirements = extra_requirements(args.extra)
    if requirements is None:
        return Step("install", True, f"pyproject.toml has no {args.extra!r} extra: nothing to install")
    missing = [r for r in requirements if not _installed(r)]
    if not missing:
        return Step("install", True, f"extra {args.extra!r} already installed: {', '.join(requirements)}")
    if args.no_install:
        return Step("install", False, f"extra {args.extra!r} missing ({', '.join(missing)}) and "
                                      "--no-install given")
    t = time.monotonic()  # the requirements alone: reinstalling psiopt could replace CUDA torch
    rc, tail = _run([python, "-m", "pip", "install", *missing], cap, work / "install.log")
    return Step("install", rc == 0, f"pip install {' '.join(missing)}: "
                + ("done" if rc == 0 else "failed"), time.monotonic() - t, "" if rc == 0 else tail)


def judge_tests(rc, tail: str, junit: Path, gpus: int, seconds: float) -> Step:
    """The test step's result from pytest's exit status (``None``: timed out) and junit file; a
    run that timed out fails, with the results of the tests that finished before it."""
    if not junit.exists():
        why = "timed out" if rc is None else f"exit {rc}"
        return Step("tests", False, f"pytest wrote no results ({why} after {seconds:.0f} s)",
                    seconds, tail)
    results = parse_junit(junit)
    ok, forbidden, allowed = results.judge(gpus)
    summary = (f"{len(results.passed)} passed, {len(results.failed)} failed, "
               f"{len(results.skipped)} skipped ({len(forbidden)} of them CUDA tests)")
    if rc is None:
        summary = f"timed out after {seconds:.0f} s, before the tests' end: {summary}"
    details = []
    if results.failed:
        details.append("Failed:\n" + "\n".join(f"- {t}" for t in results.failed))
    if forbidden:
        details.append("Skipped CUDA tests (this fails the check):\n"
                       + "\n".join(f"- {t}" for t in forbidden))
    if allowed:
        details.append("Skips allowed (not CUDA tests on this machine):\n"
                       + "\n".join(f"- {t}" for t in allowed))
    if not results.passed:
        details.append("No test passed.")
    if not ok or rc != 0:
        details.append("pytest's last lines:\n\n```\n" + tail + "\n```")
    return Step("tests", ok and rc == 0, summary, seconds, "\n\n".join(details))


def judge_training(metrics: Path) -> str | None:
    """Why the training run's ``metrics.jsonl`` fails the check (``None``: it passes): missing,
    no epoch, a diverged epoch or a loss that is not a finite number (``psiopt train`` exits 0
    when a run diverges: it records it and stops)."""
    if not metrics.exists():
        return f"no {metrics.name} written"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return f"{metrics.name} holds no epoch"
    for record in records:
        loss = record.get("train_loss")
        if record.get("diverged") or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return (f"epoch {record.get('epoch', '?')} diverged or has no finite train loss "
                    f"({record.get('error') or loss!r})")
    return None


def visible_device(index: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the tests of ``--device cuda:<index>``: that GPU alone, the
    index read among the GPUs this process sees (an existing ``CUDA_VISIBLE_DEVICES`` list)."""
    seen = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if seen and int(index) >= len(seen):  # (never a GPU the list hides; run_check refuses it first)
        raise ValueError(f"cuda:{index}: CUDA_VISIBLE_DEVICES={','.join(seen)} shows {len(seen)} GPU(s)")
    return seen[int(index)] if seen else index


def finish(args, env: dict, steps: list[Step], work: Path) -> int:
    """Write the report, say what failed in one line each; the exit status."""
    ok = write_report(args, env, steps, work, done=True)
    for s in steps:
        if not s.ok:
            print(f"gpu-check: FAILED at {s.name}: {s.summary}", file=sys.stderr)
    print(f"gpu-check: {'PASSED' if ok else 'FAILED'}; report written to {args.report}",
          file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def write_report(args, env: dict, steps: list[Step], work: Path, done: bool = False) -> bool:
    """The report of the steps so far (written after each step, so that a check killed later
    leaves them; ``done``: the last); whether all passed."""
    ok = all(s.ok for s in steps)
    state = ("PASSED" if ok else "FAILED") if done else \
        f"UNFINISHED ({'no' if ok else 'a'} step failed so far; the check is running or was killed)"
    lines = [f"# psiopt GPU check: {state}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `scripts/gpu_check.py`; "
             f"artefacts (logs, junit.xml, bench.md, train/) in `{work}`.", "",
             "## Environment", "", "```", json.dumps(env, indent=1), "```", "",
             "## Steps", "", "| step | result | seconds | summary |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {'ok' if s.ok else 'FAILED'} | {s.seconds:.0f} | {s.summary} |"
              for s in steps]
    for s in steps:
        if s.details:
            lines += ["", f"### {s.name}", "", s.details]
    bench = work / "bench.md"
    if any(s.name == "bench" and s.ok for s in steps) and bench.exists():
        lines += ["", "## Benchmark (`psiopt bench --device cuda`)", "",
                  re.sub(r"^#", "##", bench.read_text().split("## How the steps run")[0],
                         flags=re.M)]
    metrics = work / "train" / "metrics.jsonl"
    if any(s.name == "train" for s in steps) and metrics.exists():
        lines += ["", "## Training (`psiopt train --device cuda`, resnet20, synthetic data)", "",
                  "```", metrics.read_text().strip(), "```"]
    Path(args.report).write_text("\n".join(lines) + "\n")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default="gpu-report.md", help="the report file (markdown)")
    parser.add_argument("--workdir", default="gpu-check", help="logs and artefacts")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--extra", default="gpu", help="optional dependencies to install")
    parser.add_argument("--tests", default=",".join(TEST_FILES),
                        help="comma-separated test files run with pytest -rs (default: %(default)s)")
    parser.add_argument("--no-install", action="store_true", help="fail if the extra is missing")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device!r}: expected cuda or cuda:N")
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's psiopt, whatever is installed
    try:
        import torch  # noqa: F401

        import psiopt  # noqa: F401
    except ImportError as e:
        print(f"gpu-check: FAILED: {sys.executable} cannot import torch and psiopt ({e}); install "
              "a CUDA build of torch, then `pip install -e .` in this repository", file=sys.stderr)
        return 1
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
