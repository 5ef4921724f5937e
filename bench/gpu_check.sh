#!/usr/bin/env bash
# GPU check of the kernels issue (issue 3): build the CUDA module, run the gpu-marked tests of
# tests/test_ops.py (CUDA and compiled Triton against the torch reference, the >2**31-element step),
# and a short benchmark of adamw_step and the HPA passes against torch's fused AdamW and the GPU's
# own copy bandwidth. One GPU, under 5 minutes; prints a summary at the end.
#
#   bash bench/gpu_check.sh            # uses `python` from PATH (needs torch with CUDA, triton, pytest)
#   PYTHON=/path/to/python HPA_CUDA_ARCHS=90 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export HPA_CUDA_ARCHS="${HPA_CUDA_ARCHS:-$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || echo 90)}"
export HPA_BUILD_CUDA=1
unset TRITON_INTERPRET
LOG="${TMPDIR:-/tmp}/hpa_gpu_check"
mkdir -p "$LOG"
status() { printf '%-28s %s\n' "$1" "$2" >>"$LOG/summary.txt"; }
: >"$LOG/summary.txt"

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible to torch"; print(torch.cuda.get_device_name(0), torch.__version__)' \
  || { echo "gpu_check: no CUDA GPU"; exit 2; }

start=$(date +%s)
if timeout 300 "$PY" setup.py build_ext --inplace >"$LOG/build.log" 2>&1; then
  status build "ok ($(( $(date +%s) - start ))s, archs $HPA_CUDA_ARCHS)"
else
  status build "FAILED (see $LOG/build.log)"; tail -30 "$LOG/build.log"; cat "$LOG/summary.txt"; exit 1
fi
"$PY" -c 'from hpa_kernels import ops; print("backends:", ops.available_backends())' | tee -a "$LOG/summary.txt"

timeout 240 "$PY" -m pytest tests/test_ops.py -m gpu -q -p no:cacheprovider -x >"$LOG/tests.log" 2>&1
rc=$?
status "gpu tests" "$(tail -1 "$LOG/tests.log") (rc=$rc)"
[ $rc -ne 0 ] && grep -E "^(FAILED|ERROR|E )" "$LOG/tests.log" | head -20

timeout 120 "$PY" - >"$LOG/bench.txt" 2>&1 <<'PYEOF'
import torch
from hpa_kernels import ops

dev = torch.device("cuda")
def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]

n = 2**27  # 134M fp32 elements per tensor
src = torch.empty(n, device=dev); dst = torch.empty_like(src)
copy_s = timed(lambda: dst.copy_(src))
copy_bw = 2 * 4 * n / copy_s / 1e9
print(f"copy bandwidth            {copy_bw:8.0f} GB/s")

shapes = [(4096, 4096)] * 6 + [(4096, 11008)] * 3 + [(4096,)] * 8  # Llama-style slice, ~2.2e8 params
for dtype in (torch.float32, torch.bfloat16):
    params = [torch.randn(s, device=dev, dtype=dtype) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    moved = numel * (3 * params[0].element_size() + 4 * 4)  # p r/w, g r, m r/w, v r/w
    for backend in [b for b in ("cuda", "triton") if b in ops.available_backends()]:
        ms = [torch.zeros(p.shape, device=dev) for p in params]; vs = [torch.zeros(p.shape, device=dev) for p in params]
        steps = [torch.zeros((), device=dev) for _ in params]
        t = timed(lambda: ops.adamw_step(params, grads, ms, vs, steps, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, backend=backend))
        print(f"adamw {str(dtype)[6:]:8s} {backend:7s} {t*1e3:7.2f} ms {moved/t/1e9:6.0f} GB/s {moved/t/1e9/copy_bw:5.0%} of copy")
    if dtype == torch.float32 or True:
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)
        t = timed(opt.step)
        print(f"adamw {str(dtype)[6:]:8s} torch-fused {t*1e3:7.2f} ms {moved/t/1e9:6.0f} GB/s")
w0 = torch.randn(4096, 11008, device=dev); w1 = w0 + 0.01 * torch.randn_like(w0); h = torch.rand(11008, device=dev) + 0.5
mask = torch.rand(11008, device=dev) < 0.1
for backend in [b for b in ("torch", "cuda", "triton") if b in ops.available_backends()]:
    tr = timed(lambda: ops.hpa_reduce(w0, w1, h, h, backend=backend))
    ta = timed(lambda: ops.hpa_apply(w0, w1, mask, 0.01, backend=backend))
    b = w0.numel() * 4
    print(f"hpa_reduce {backend:7s} {tr*1e3:7.2f} ms {2*b/tr/1e9:6.0f} GB/s | hpa_apply {ta*1e3:7.2f} ms {3*b/ta/1e9:6.0f} GB/s")
PYEOF
rc=$?
status benchmark "rc=$rc"
echo "---- benchmark ----"; cat "$LOG/bench.txt"
echo "---- summary ($(( $(date +%s) - start ))s) ----"; cat "$LOG/summary.txt"
