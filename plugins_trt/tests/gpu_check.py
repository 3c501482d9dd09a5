"""One-shot GPU check of the VisionDrop kernels (no TensorRT needed): build, verify, time.

Run ``bash plugins_trt/tests/gpu_check.sh`` from the repo root on a machine with a CUDA GPU and
PyTorch. Steps: (1) build libvisiondrop_kernels.so for this GPU's architecture (sm_90 on H100/H200)
with CMake, or with nvcc directly when cmake is missing; (2) run test_kernels_gpu.py against it;
(3) time select and merge against the PyTorch reference (visiondrop_edge.pruning) on the same inputs.
Writes gpu_check.md / gpu_check.json / pytest.txt to $OUT (else build/plugins_trt/gpu_check/).
Set VISIONDROP_KERNELS_LIB to use a prebuilt library instead of building (no nvcc here).
Exit status 0 only if the tests pass, every op beats PyTorch and N=576, D=4096 runs under 50 us.

Timing: CUDA events around one call, median of 200 after 20 warm-ups. Before each timed call a
~1 ms GPU spin kernel is queued, so the host has enqueued the whole op before the GPU reaches
the start event: the events then measure GPU time, not Python launch overhead. A host sync inside
an op (the reference merge builds an index tensor from a Python list) still shows, as it would in
a pipeline. "wall us" is host-side time per call including synchronisation, for context.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

import torch

from visiondrop_edge.plugins_trt import build as vd_build
from visiondrop_edge import pruning

CASES = [  # (N, D, M, k, c): B = 1, fp16
    (576, 4096, 128, 168, 24),   # LLM stage, LLaVA-1.5-7B
    (577, 1024, 64, 168, 24),    # vision stage (CLS + 576 patches, CLIP ViT-L)
    (2880, 4096, 128, 168, 24),  # LLaVA-NeXT-sized image
]
TARGET_US = 50.0
SPIN_CYCLES = 2_000_000  # ~1 ms at H200 clocks


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_kernels(arch: str, build_dir: Path) -> tuple[Path, str]:
    """CMake build if cmake exists, else one nvcc command; returns (library, how)."""
    if vd_build.find_cmake():
        return vd_build.build(archs=[arch], build_dir=build_dir)["kernels"], "cmake"
    nvcc = vd_build.find_nvcc()
    if nvcc is None:
        raise SystemExit("gpu_check: neither cmake nor nvcc found: install the CUDA toolkit (nvcc)")
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / vd_build.KERNELS_LIB
    source = vd_build.SOURCE_DIR
    command = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{source / 'include'}",
               str(source / "src" / "visiondrop_kernels.cu"), "-o", str(library)]
    subprocess.run(command, check=True)
    return library, "nvcc"


def run_tests(library: Path, out_dir: Path) -> dict:
    """pytest on test_kernels_gpu.py with the just-built library; output kept in pytest.txt."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "not run", "summary": "pytest is not installed here"}
    env = dict(os.environ, VISIONDROP_KERNELS_LIB=str(library))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               str(Path(__file__).with_name("test_kernels_gpu.py"))]
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as expired:
        output, code = f"{expired.stdout or ''}\nTIMEOUT after 240 s", -1
    (out_dir / "pytest.txt").write_text(output)
    lines = [line for line in output.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " in " in line and ("passed" in line or "failed" in line)),
                   lines[-1] if lines else "")
    passed = code == 0 and "passed" in summary  # all-skipped (no GPU seen by pytest) is not a pass
    return {"status": "passed" if passed else "failed", "exit_code": code, "summary": summary.strip("= ")}


def gpu_us(fn, iterations: int = 200, warmup: int = 20) -> float:
    """Median GPU time of one ``fn()`` in microseconds (see the module docstring)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(iterations):
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(samples)


def wall_us(fn, iterations: int = 100) -> float:
    samples = []
    for _ in range(iterations):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(samples)


def time_cases(kernels) -> list[dict]:
    from visiondrop_edge.pruning import Selection

    rows = []
    dtype = torch.float16
    for n, d, m, k, c in CASES:
        torch.manual_seed(n)
        scores = (torch.randperm(n, device="cuda").float() / n)[None]
        if n == 577:
            scores[:, 0] = float("inf")
        tokens = torch.randn(1, n, d, device="cuda", dtype=dtype)
        metric = torch.randn(1, n, m, device="cuda")
        r = n - k
        empty = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="cuda")  # noqa: E731
        chosen = Selection(empty(1, k, d), empty(1, r, d), empty(1, r, m, dt=torch.float32),
                           empty(1, k, dt=torch.int32), empty(1, r, dt=torch.int32))
        rest_tokens = torch.randn(1, r, d, device="cuda", dtype=dtype)
        rest_metric = torch.randn(1, r, m, device="cuda")
        merged = pruning.Merged(empty(1, c, d), empty(1, r - c, dt=torch.int32))
        ops = {
            f"select k={k}": (f"B=1 N={n} D={d} M={m}",
                              lambda: kernels.select(scores, tokens, metric, k, out=chosen),
                              lambda: pruning.select(scores, tokens, metric, k)),
            f"merge c={c}": (f"B=1 R={r} D={d} M={m}",
                             lambda: kernels.merge(rest_tokens, rest_metric, c, out=merged),
                             lambda: pruning.merge(rest_tokens, rest_metric, c)),
        }
        for op, (shape, kernel_fn, torch_fn) in ops.items():
            row = {"op": op, "shape": shape, "dtype": "fp16", "N": n, "D": d,
                   "kernel_us": gpu_us(kernel_fn), "torch_us": gpu_us(torch_fn),
                   "kernel_wall_us": wall_us(kernel_fn), "torch_wall_us": wall_us(torch_fn)}
            row["speedup"] = row["torch_us"] / row["kernel_us"]
            rows.append(row)
            log(f"{op:14s} {shape:28s} kernel {row['kernel_us']:8.1f} us  torch {row['torch_us']:8.1f} us")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| op | shape | dtype | kernel us | torch us | speed-up | kernel wall us | torch wall us |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['kernel_us']:.1f} | {r['torch_us']:.1f} | "
                     f"{r['speedup']:.1f}x | {r['kernel_wall_us']:.1f} | {r['torch_wall_us']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    started = time.time()
    if not torch.cuda.is_available():
        print("gpu_check: PyTorch sees no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    out_dir = Path(os.environ.get("OUT") or REPO_ROOT / "build" / "plugins_trt" / "gpu_check")
    out_dir.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    arch = os.environ.get("VISIONDROP_ARCH", f"{major}{minor}")
    device = torch.cuda.get_device_name()
    log(f"device {device} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"building sm_{arch}")

    t0 = time.time()
    if os.environ.get("VISIONDROP_KERNELS_LIB"):  # prebuilt elsewhere (e.g. no nvcc on this machine)
        library, how = Path(os.environ["VISIONDROP_KERNELS_LIB"]), "prebuilt ($VISIONDROP_KERNELS_LIB)"
    else:
        library, how = build_kernels(arch, vd_build.DEFAULT_BUILD_DIR / "gpu_check" / f"sm{arch}")
    build_s = time.time() - t0
    log(f"built {library} with {how} in {build_s:.0f} s")

    t0 = time.time()
    tests = run_tests(library, out_dir)
    log(f"tests {tests['status']}: {tests['summary']} ({time.time() - t0:.0f} s; log in {out_dir / 'pytest.txt'})")

    from visiondrop_edge.plugins_trt.kernels import Kernels

    rows = time_cases(Kernels(library))
    table = markdown(rows)
    reference = [r for r in rows if r["N"] == 576 and r["D"] == 4096]
    checks = {
        "tests passed": tests["status"] == "passed",
        "every op faster than PyTorch": all(r["speedup"] > 1.0 for r in rows),
        f"N=576 D=4096 under {TARGET_US:.0f} us":
            bool(reference) and all(r["kernel_us"] < TARGET_US for r in reference),
    }
    verdict = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items())
    report = (f"# VisionDrop kernels on {device}\n\n"
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, sm_{arch}, "
              f"built with {how} in {build_s:.0f} s\n\n"
              f"Tests: {tests['status']} ({tests['summary']})\n\n{table}\n\n{verdict}\n")
    print("\n" + report)
    (out_dir / "gpu_check.md").write_text(report)
    (out_dir / "gpu_check.json").write_text(json.dumps({
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "arch": arch,
        "build": {"tool": how, "seconds": build_s, "library": str(library)}, "tests": tests,
        "timings": rows, "checks": checks, "seconds": time.time() - started,
    }, indent=2))
    log(f"wrote {out_dir / 'gpu_check.md'} and gpu_check.json ({time.time() - started:.0f} s total)")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
