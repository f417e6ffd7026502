"""``scripts/gpu_check.sh`` (``make gpu-check``) on a machine without a GPU: what it can check here.
It must fail loudly, never skip: no CUDA is a failure with a one-line reason and a report saying
FAILED, and a skipped CUDA test fails the test step."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def run_script(*args, **env):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_without_cuda_the_check_fails_with_one_line_and_a_report(tmp_path):
    """``CUDA_VISIBLE_DEVICES=""`` hides any GPU, so this runs the same on a GPU machine."""
    report = tmp_path / "gpu-report.md"
    done = run_script("--report", str(report), "--workdir", str(tmp_path / "work"),
                      CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 1
    assert "gpu-check: FAILED at environment: CUDA is not available:" in done.stderr
    text = report.read_text()
    assert text.startswith("# psiopt GPU check: FAILED")
    assert "| environment | FAILED |" in text and '"torch":' in text
    assert not (tmp_path / "work" / "junit.xml").exists()  # nothing ran after it


def test_dry_run_lists_the_steps_without_a_gpu(tmp_path):
    done = run_script("--dry-run", "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pytest -rs" in out and "tests/test_cuda.py tests/test_device.py" in out
    assert "bench --device cuda" in out and "train --device cuda" in out
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_device_that_is_not_cuda_is_refused():
    done = run_script("--dry-run", "--device", "cpu")
    assert done.returncode == 2 and "expected cuda or cuda:N" in done.stderr


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_step[sgd]" time="0.1"/>
<testcase classname="tests.test_device" name="test_cpu_only" time="0.0">
  <skipped type="pytest.skip" message="a machine without CUDA">skip</skipped></testcase>
<testcase classname="tests.test_device" name="test_two_gpus" time="0.0">
  <skipped type="pytest.skip" message="needs two CUDA devices">skip</skipped></testcase>
{extra}
</testsuite></testsuites>"""


@pytest.mark.parametrize("extra, gpus, ok", [
    ("", 1, True),  # the allowed skips on one GPU
    ("", 2, False),  # with two GPUs the NCCL test must run
    ('<testcase classname="tests.test_cuda" name="test_x" time="0"><skipped message="needs a '
     'CUDA device">s</skipped></testcase>', 1, False),  # a CUDA test skipped
    ('<testcase classname="tests.test_cuda" name="test_x" time="0"><failure message="boom">'
     'f</failure></testcase>', 1, False),
    ('<testcase classname="tests.test_cuda" name="test_x" time="0"><error message="setup">'
     'e</error></testcase>', 1, False),
])
def test_skips_and_failures_are_judged(tmp_path, extra, gpus, ok):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT.format(extra=extra))
    step = gpu_check.judge_tests(0, "tail", junit, gpus, 1.0)
    assert step.ok is ok
    assert "Skips allowed" in step.details or gpus == 2
    if "needs a CUDA device" in extra:
        assert "Skipped CUDA tests (this fails the check):" in step.details
        assert "test_x: needs a CUDA device" in step.details


def test_no_result_and_nothing_passed_fail(tmp_path):
    assert not gpu_check.judge_tests(0, "", tmp_path / "absent.xml", 1, 0).ok
    assert not gpu_check.judge_tests(None, "", tmp_path / "absent.xml", 1, 0).ok  # timed out
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="pytest"></testsuite></testsuites>')
    step = gpu_check.judge_tests(0, "", junit, 1, 0)
    assert not step.ok and "No test passed." in step.details


def test_an_extra_importable_under_another_distribution_is_not_installed_again(monkeypatch):
    """triton from torch's nightly builds is the distribution ``pytorch-triton``: importable as
    ``triton``, it counts as installed (no pip install, which fails without network or replaces
    it); a requirement neither installed nor importable is missing."""
    import importlib.metadata

    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_distribution)
    assert gpu_check._installed("pytest>=7")  # importable as a module
    assert not gpu_check._installed("surely-not-a-module-psiopt>=1")


def test_missing_prerequisites_fail_the_check_before_anything_runs(tmp_path, monkeypatch):
    """A module the steps import or a C compiler missing (a machine without network cannot
    install them on the way): the environment step fails and says what, nothing else runs."""
    monkeypatch.setattr(gpu_check, "PREREQUISITE_MODULES", ("pytest", "surely_not_a_module_psiopt"))
    monkeypatch.setattr(gpu_check, "_run", lambda *a, **k: pytest.fail("a step ran"))
    rc = gpu_check.main(["--workdir", str(tmp_path / "w"), "--report", str(tmp_path / "r.md")])
    report = (tmp_path / "r.md").read_text()
    assert rc == 1 and "prerequisites missing: the module surely_not_a_module_psiopt" in report


def test_a_step_past_its_cap_is_interrupted_so_that_pytest_can_write_its_results(tmp_path, monkeypatch):
    """SIGINT first (pytest then writes the junit of the tests that finished), a kill only after
    the grace period: a timed-out test step still reports what ran (killed at once, it left no
    junit and a log of dots)."""
    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 20)
    mark = tmp_path / "interrupted"
    code = ("import signal, sys, time\n"
            "def stop(*_):\n"
            f"    open({str(mark)!r}, 'w').write('results')\n"
            "    sys.exit(2)\n"
            "signal.signal(signal.SIGINT, stop)\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    rc, tail = gpu_check._run([sys.executable, "-c", code], 2, tmp_path / "log")
    assert rc is None and mark.read_text() == "results" and "started" in tail


def test_a_timed_out_test_run_fails_with_the_results_it_has(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT.format(extra=""))
    step = gpu_check.judge_tests(None, "tail", junit, 1, 400.0)
    assert not step.ok and step.summary.startswith("timed out after 400 s") and "1 passed" in step.summary


def test_training_that_diverges_fails_the_check(tmp_path):
    """``psiopt train`` exits 0 on a diverged run (it records it and stops): the metrics decide."""
    metrics = tmp_path / "metrics.jsonl"
    assert "no metrics.jsonl" in gpu_check.judge_training(metrics)
    metrics.write_text('{"epoch": 0, "train_loss": 2.1}\n{"epoch": 1, "train_loss": 1.9}\n')
    assert gpu_check.judge_training(metrics) is None
    metrics.write_text('{"epoch": 0, "train_loss": 2.1}\n'
                       '{"epoch": 1, "train_loss": null, "diverged": true}\n')
    assert "epoch 1 diverged" in gpu_check.judge_training(metrics)
    metrics.write_text('{"epoch": 0, "train_loss": NaN}\n')
    assert "epoch 0" in gpu_check.judge_training(metrics)


def test_the_tests_see_the_gpu_that_device_names(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_check.visible_device("1") == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_check.visible_device("1") == "5"
    with pytest.raises(ValueError, match="shows 2 GPU"):  # never GPU 2, which the list hides
        gpu_check.visible_device("2")


def test_a_device_index_past_the_gpus_this_process_sees_fails_before_anything_runs(tmp_path,
                                                                                    monkeypatch):
    env = {"missing": [], "cuda": True, "gpus": 2, "gpu": ["A", "B"]}
    monkeypatch.setattr(gpu_check, "environment", lambda: env)
    monkeypatch.setattr(gpu_check, "_run", lambda *a, **k: pytest.fail("a step ran"))
    rc = gpu_check.main(["--device", "cuda:2", "--workdir", str(tmp_path / "w"),
                         "--report", str(tmp_path / "r.md")])
    assert rc == 1 and "--device cuda:2: this process sees 2 GPU(s)" in (tmp_path / "r.md").read_text()


def test_an_installed_version_the_extra_does_not_allow_is_missing(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.2.0")
    assert not gpu_check._installed("triton>=3.3")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.6.0")
    assert gpu_check._installed("triton>=3.3")


def test_a_report_written_between_steps_says_the_check_is_unfinished(tmp_path):
    args = type("Args", (), {"report": str(tmp_path / "r.md")})()
    steps = [gpu_check.Step("environment", True, "1 GPU(s)")]
    assert gpu_check.write_report(args, {}, steps, tmp_path)
    assert (tmp_path / "r.md").read_text().startswith("# psiopt GPU check: UNFINISHED")
    assert gpu_check.write_report(args, {}, steps, tmp_path, done=True)
    assert (tmp_path / "r.md").read_text().startswith("# psiopt GPU check: PASSED")
