"""bench/gpu_check.py without a GPU: its byte counts, the verdict on a pytest run, the event counts,
the bit comparison, the exit status and timeouts, and runs of ``bash bench/gpu_check.sh`` (a dry
run of some of its steps, and a GPU run that must fail for want of a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402

# ------------------------------------------------------------------------------------ byte counts


def test_adamw_bytes_per_element():
    """fp32 p r/w 8 + g 4 + fp32 m r/w 8 + v r/w 8 = 28; bf16 p, g with fp32 moments = 22; torch's
    fused AdamW on bf16 keeps bf16 moments: 7 streams of 2 = 14."""
    assert gpu_check.adamw_bytes(1, 4) == 28
    assert gpu_check.adamw_bytes(1, 2) == 2 + 2 + 2 + 16
    assert gpu_check.adamw_bytes(1, 2, 2) == 7 * 2 == 14
    assert gpu_check.adamw_bytes(1, 4, 4) == 28
    assert gpu_check.adamw_bytes(4096 * 4096, 4) == 28 * 4096 * 4096


def test_hpa_bytes():
    r, c = 5, 3
    # reduce: W_prev + W_new read; col_energy written (fp64, c); dot and norm_sq written (fp32 0-d)
    assert gpu_check.reduce_bytes(r, c, 4) == 2 * r * c * 4 + c * 8 + 2 * 4
    assert gpu_check.reduce_bytes(r, c, 2) == 2 * r * c * 2 + c * 8 + 2 * 4
    # apply: W_prev, W_new read, out written; the bool mask read
    assert gpu_check.apply_bytes(r, c, 2) == 3 * r * c * 2 + c
    # online pass 1: W r/w, g, W_prev (storage dtype), fp32 m and v r/w; mask, col_energy r/w per column;
    # pass 2: W r/w, W_prev, and the mask again
    pass1 = r * c * (4 * 4 + 4 * 4) + c * (1 + 8)
    pass2 = r * c * 3 * 4 + c
    assert gpu_check.online_bytes(r, c, 4, orthogonal=False) == pass1
    assert gpu_check.online_bytes(r, c, 4) == pass1 + pass2
    assert gpu_check.online_bytes(r, c, 2) == r * c * (4 * 2 + 16 + 3 * 2) + 10 * c


# ------------------------------------------------------------------------------------ the pytest verdict

_JUNIT_TESTS = """
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA GPU and the 'cuda' backend")
def test_cuda():
    pass

def test_two_gpus():
    pytest.skip("needs two GPUs and triton")
"""


@pytest.fixture(scope="module")
def junit_run(tmp_path_factory):
    """A real pytest run (one pass, a skipif mark, a pytest.skip) and its JUnit XML file."""
    folder = tmp_path_factory.mktemp("junit")
    (folder / "test_sample.py").write_text(textwrap.dedent(_JUNIT_TESTS))
    junit = folder / "result.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "test_sample.py"]
    rc = subprocess.run(argv, cwd=folder, capture_output=True, timeout=60).returncode
    return junit, rc


def _junit(tmp_path, cases: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


def test_tests_check_reads_real_skip_reasons(junit_run):
    junit, rc = junit_run
    assert rc == 0
    one_gpu = gpu_check.expected_skips(gpus=1, gpu_memory_gib=139.0, dry_run=False)
    check = gpu_check.tests_check(junit, rc, expected=one_gpu, dry_run=False)
    assert check.status == "FAIL"  # a CUDA test green-skipped on a GPU: _C_cuda did not load
    assert "unexpected skips: needs a CUDA GPU and the 'cuda' backend" in check.detail
    assert "needs two GPUs" not in check.detail.split("unexpected skips:")[1]

    dry = gpu_check.expected_skips(gpus=0, gpu_memory_gib=0.0, dry_run=True)
    check = gpu_check.tests_check(junit, rc, expected=dry, dry_run=True)
    assert check.status == "ok", check.detail
    assert check.detail.startswith("1 passed, 0 failed, 2 skipped")

    two_gpus = gpu_check.expected_skips(gpus=2, gpu_memory_gib=139.0, dry_run=True)
    check = gpu_check.tests_check(junit, rc, expected=two_gpus, dry_run=True)
    assert check.status == "FAIL" and "needs two GPUs and triton" in check.detail


def test_tests_check_memory_skip_only_on_small_gpus(tmp_path):
    junit = _junit(
        tmp_path,
        '<testcase name="a"/><testcase name="big"><skipped message="needs about 30 GiB of GPU memory"/></testcase>',
    )
    small = gpu_check.expected_skips(gpus=1, gpu_memory_gib=24.0, dry_run=False)
    large = gpu_check.expected_skips(gpus=1, gpu_memory_gib=80.0, dry_run=False)
    assert gpu_check.tests_check(junit, 0, expected=small, dry_run=False).status == "ok"
    assert gpu_check.tests_check(junit, 0, expected=large, dry_run=False).status == "FAIL"


@pytest.mark.parametrize(
    ("cases", "rc", "dry_run", "words"),
    [
        ('<testcase name="a"/><testcase name="b"><failure message="x"/></testcase>', 1, False, "b (failure)"),
        ('<testcase name="tests.test_ops"><error message="collection failure"/></testcase>', 2, True, "(error)"),
        ("", 5, True, "no test ran"),
        ('<testcase name="a"><skipped message="needs two GPUs and triton"/></testcase>', 0, False, "0 passed"),
        ('<testcase name="a"/>', 3, False, "exit status 3"),
    ],
    ids=["failure", "collection-error", "no-tests", "nothing-passed-on-gpu", "nonzero-exit"],
)
def test_tests_check_failures(tmp_path, cases, rc, dry_run, words):
    expected = gpu_check.expected_skips(gpus=1, gpu_memory_gib=139.0, dry_run=dry_run)
    check = gpu_check.tests_check(_junit(tmp_path, cases), rc, expected=expected, dry_run=dry_run)
    assert check.status == "FAIL"
    assert words in check.detail


def test_tests_check_without_result_file(tmp_path):
    check = gpu_check.tests_check(tmp_path / "missing.xml", 1, expected=[], dry_run=True)
    assert check.status == "FAIL" and "without a readable result file" in check.detail


# ------------------------------------------------------------------------------------ profiler events


def _event(name, device, start, end=None, annotation=False):
    kind = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    span = SimpleNamespace(start=start, end=start + 1 if end is None else end)
    return SimpleNamespace(name=name, device_type=kind, time_range=span, is_user_annotation=annotation)


def test_count_events():
    marker = "gpu_check.step"
    events = [
        _event(marker, "cpu", 10, 20),
        _event("cudaLaunchKernel", "cpu", 11),
        _event("cudaStreamSynchronize", "cpu", 15),  # inside the step: a host sync
        _event("cudaDeviceSynchronize", "cpu", 25),  # the synchronize that ends the profile
        _event("cudaMemcpyAsync", "cpu", 12),
        _event(marker, "cuda", 30, 40, annotation=True),  # the marker's device-side annotation
        _event("adamw_kernel", "cuda", 31),
        _event("hpa_reduce_blocks_kernel", "cuda", 33),
        _event("Memset (Device)", "cuda", 34),
        _event("Memcpy HtoD (Pageable -> Device)", "cuda", 35),  # pageable: synchronises
        _event("Memcpy DtoD (Device -> Device)", "cuda", 36),
    ]
    assert gpu_check.count_events(events, marker) == {"kernels": 2, "copies": 3, "syncs": 2}
    assert gpu_check.count_events(events[:3], marker) == {"kernels": 0, "copies": 0, "syncs": 1}


# ------------------------------------------------------------------------------------ bit comparison


def _outputs(c=6):
    gen = torch.Generator().manual_seed(0)
    energy = torch.rand(c, generator=gen, dtype=torch.float64)
    eps_bar, zeta_bar = torch.rand(c, generator=gen), torch.rand(c, generator=gen)
    return [energy, torch.tensor(0.5), torch.tensor(2.0), eps_bar, zeta_bar, eps_bar > 0.5]


def test_compare_bits_equal_and_nan():
    want = _outputs()
    want[1] = torch.tensor(float("nan"))
    want[0][2] = float("nan")
    got = [t.clone() for t in want]
    assert gpu_check.compare_bits(want, {"cuda": got, "triton": [t.clone() for t in want]}) == []


def test_compare_bits_finds_one_bit():
    want = _outputs()
    want[2] = torch.tensor(0.0)
    one_ulp = [t.clone() for t in want]
    one_ulp[3].view(torch.int32)[3] ^= 1
    one_ulp_energy = [t.clone() for t in want]
    one_ulp_energy[0].view(torch.int64)[5] ^= 1  # a float64 ulp: lost if compared in float32
    signed_zero = [t.clone() for t in want]
    signed_zero[2] = torch.tensor(-0.0)  # == 0.0 as floats, not as bits
    mask = [t.clone() for t in want]
    mask[5][0] = ~mask[5][0]
    wrong_dtype = [t.clone() for t in want]
    wrong_dtype[4] = wrong_dtype[4].double()
    found = gpu_check.compare_bits(
        want,
        {
            "cuda": one_ulp,
            "cuda-e": one_ulp_energy,
            "triton": signed_zero,
            "cpu": mask,
            "torch": wrong_dtype,
            "same": want,
        },
    )
    assert found == [
        "cuda eps_bar: 1 of 6 differ",
        "cuda-e col_energy: 1 of 6 differ",
        "triton norm_sq: 1 of 1 differ",
        "cpu mask: 1 of 6 differ",
        "torch zeta_bar: torch.float64 (6,) != torch.float32 (6,)",
    ]


# ------------------------------------------------------------------------------------ running


def test_exit_status_of_a_summary():
    rows = [{"status": "ok"}, {"status": "skip"}, {"status": "ok"}]
    assert gpu_check.exit_status(rows) == 0
    assert gpu_check.exit_status(rows + [{"status": "FAIL"}]) == 1
    assert gpu_check.exit_status([]) == 0


def test_steps_and_timeouts(monkeypatch):
    assert sum(step.timeout_s for step in gpu_check.STEPS) < 300
    monkeypatch.setenv("HPA_GPU_CHECK_TIMEOUT_SCALE", "2")
    step = gpu_check.STEPS[0]
    assert gpu_check.step_timeout(step, dry_run=False) == 2 * step.timeout_s
    assert [s.name for s in gpu_check.select_steps("bits,tests")] == ["env", "tests", "bits"]
    assert gpu_check.select_steps(None) == gpu_check.STEPS
    with pytest.raises(ValueError, match="unknown steps"):
        gpu_check.select_steps("env,bogus")


def test_run_command_kills_at_its_timeout(tmp_path):
    argv = [
        sys.executable,
        "-c",
        "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])",
    ]
    outcome = gpu_check.run_command(argv, timeout_s=1, log=tmp_path / "log", env=os.environ)
    assert outcome.timed_out and outcome.rc == -9 and outcome.seconds < 10


def test_llama7b_spec_has_291_tensors():
    spec = gpu_check.llama7b_spec(256, 32000)
    assert spec.num_tensors == 291
    shapes = {s.name: (s.out_features, s.in_features) for s in spec.linears}
    assert shapes["k_proj"] == (256, 256) and shapes["gate_proj"] == (688, 256) and shapes["down_proj"] == (256, 688)


def _summary(log: Path) -> dict[tuple[str, str], str]:
    """(step, check) → status, from the table of ``log``/summary.txt."""
    lines = (log / "summary.txt").read_text().splitlines()
    assert lines[1].split()[:4] == ["step", "check", "status", "s"]
    return {tuple(line.split()[:2]): line.split()[2] for line in lines[2:]}


def _check_sh(args: list[str], log: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HPA_GPU_CHECK_DRY_RUN"}
    # Steps may take 4x their GPU-run timeouts here: the test machine may be loaded (CI, other tests).
    environ |= {"PYTHON": sys.executable, "HPA_GPU_CHECK_TIMEOUT_SCALE": "4", **env}
    argv = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args, "--log", str(log)]
    return subprocess.run(argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900)


def test_dry_run_of_some_steps(tmp_path):
    """The dry run end to end on a subset of its steps (the whole dry run takes a minute or more on
    a CPU machine): env, build (skipped) and bits (cpu and Triton-interpreter bits against torch's);
    exit status 0 and one summary row per check."""
    result = _check_sh(["--steps", "build,bits"], tmp_path, HPA_GPU_CHECK_DRY_RUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu_check (dry run" in result.stdout
    assert _summary(tmp_path) == {
        ("env", "versions"): "ok",
        ("env", "gpu"): "skip",
        ("build", "build"): "skip",
        ("bits", "bits"): "ok",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure of a GPU run without a GPU")
def test_gpu_run_without_a_gpu_fails(tmp_path):
    result = _check_sh(["--steps", "build"], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "torch sees no CUDA GPU" in result.stdout
    assert _summary(tmp_path) == {("env", "versions"): "ok", ("env", "gpu"): "FAIL", ("build", "build"): "skip"}
