#!/usr/bin/env bash
# One call on a lent GPU machine: build, CUDA + Triton tests, compute-sanitizer
# on the new kernels, then the benchmarks; everything lands in $OUT (or ./gpu-out).
#   device run: MAX_JOBS=16 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$OUT/build.log"
python3 -m dynkernels info | tee "$OUT/info.txt"
python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/tests.log"
# compute-sanitizer on a small run of each CUDA kernel
cat > /tmp/sanitize_pointops.py <<'PY'
import torch
from dynkernels import ops
xyz = torch.rand(3, 9001, 3, device="cuda")
for n in (1000, 9001):
    idx = ops.furthest_point_sample(xyz[:, :n].contiguous(), 300, backend="cuda")
centers = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3)).contiguous()
nbr = ops.ball_query(xyz, centers, 0.2, 32, backend="cuda")
f = torch.randn(3, 16, 9001, device="cuda", requires_grad=True)
for det in (False, True):
    ops.grouping_operation(f, nbr, backend="cuda", deterministic=det).sum().backward()
# Pointformer's CUDA kernels
d2, knn_idx = ops.knn(xyz, centers, 16, backend="cuda")
dist, nn3 = ops.three_nn(xyz[:, :2000].contiguous(), centers, backend="cuda")
w = (1.0 / (dist + 1e-8)); w = (w / w.sum(-1, keepdim=True)).detach().requires_grad_()
g = torch.randn(3, 16, 300, device="cuda", requires_grad=True)
for det in (False, True):
    ops.three_interpolate(g, nn3, w, backend="cuda", deterministic=det).sum().backward()
grouped = ops.grouping_operation(xyz.transpose(1, 2).contiguous(), nbr, backend="cuda")
attn = torch.rand(3, 300, 2, 32, 32, device="cuda").softmax(-1).requires_grad_()
for row in ("centroid", "first", "mean"):
    ops.coordinate_refinement(attn, grouped, row=row, centers=centers, backend="cuda").sum().backward()
qkv = torch.randn(600, 32, 3 * 64, device="cuda", requires_grad=True)
out, weights = ops.local_attention_packed(qkv, 8, row_index=torch.zeros(600, dtype=torch.int64, device="cuda"),
                                          backend="triton")
(out.sum() + weights.sum()).backward()
# Evolving Attention's map step: CUDA (all four dtypes) and Triton, fwd + bwd
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for backend in ("cuda", "triton"):
        s = torch.randn(2, 12, 197, 197, device="cuda", dtype=dtype, requires_grad=True)
        p = torch.randn_like(s, requires_grad=True)
        wt = (0.2 * torch.randn(12, 12, 3, 3, device="cuda", dtype=dtype)).requires_grad_()
        bs = torch.randn(12, device="cuda", dtype=dtype, requires_grad=True)
        mask = torch.ones(197, 197, dtype=torch.bool, device="cuda").triu(1)
        a, pr = ops.evolve_attention_logits(s, p, wt, bs, w_prev=0.5, w_conv=1.0, mask=mask, backend=backend)
        (a.float().sum() + pr.float().square().sum()).backward()
# ISDA's full-covariance update: CUDA merge kernel and Triton kernels
for backend in ("cuda", "triton"):
    for dtype in (torch.float32, torch.float64):
        cov = torch.zeros(10, 70, 70, device="cuda", dtype=dtype)
        mean = torch.zeros(10, 70, device="cuda", dtype=dtype)
        amount = torch.zeros(10, device="cuda", dtype=dtype)
        for _ in range(2):
            feats = torch.randn(50, 70, device="cuda", dtype=dtype)
            ops.isda_update_(feats, torch.randint(0, 10, (50,), device="cuda"), cov, mean, amount, backend=backend)
        var = torch.zeros(10, 70, device="cuda", dtype=dtype)
        ops.isda_update_(feats, torch.randint(0, 10, (50,), device="cuda"), var, mean, amount, backend=backend)
# The segment substrate: every reduce, with and without perm, atomic and deterministic scatters
src = torch.randn(5000, 33, device="cuda", requires_grad=True)
index = torch.randint(-1, 70, (5000,), device="cuda")
for backend in ("cuda", "triton"):
    for reduce in ("sum", "mean", "max"):
        ops.scatter_reduce(src, index, 64, reduce, backend=backend).sum().backward()
    for det in (False, True):
        ops.scatter_add(src.half(), index, 64, deterministic=det, backend=backend)
    segs = ops.sort_segments(index, 64)
    ops.segment_reduce(src, segs.offsets, "max", perm=segs.perm, backend=backend).sum().backward()
# Spatially sparse execution: compaction, gather / scatter, masked convs (fwd + bwd), Triton
mask = torch.rand(32, 1, 56, 56, device="cuda") < 0.25
for halo in (0, 1, 2):
    index, count, inverse = ops.mask_to_index(mask, halo=halo, inverse=True, backend="triton")
x = torch.randn(32, 64, 56, 56, device="cuda", requires_grad=True)
for fmt in (torch.contiguous_format, torch.channels_last):
    xf = x.detach().contiguous(memory_format=fmt).requires_grad_()
    rows = ops.gather_pixels(xf, index, backend="triton")
    ops.scatter_pixels(rows * 2, index, xf, mode="add", backend="triton").sum().backward()
out_index, _ = ops.mask_to_index(mask, capacity=32 * 56 * 56, backend="triton")
for dtype in (torch.float32, torch.float16):
    r = rows.detach().to(dtype).requires_grad_()
    dw = torch.randn(64, 1, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    dense = torch.randn(32, 64, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    ops.masked_depthwise_conv2d(r, inverse, out_index, dw, padding=1, backend="triton").float().sum().backward()
    ops.masked_conv2d(r, inverse, out_index, dense, padding=1, backend="triton").float().sum().backward()
# Early exit: GFNet's crop (Triton), NCHW / channels-last, with an index, fwd + bwd
imgs = torch.randn(256, 3, 224, 224, device="cuda")
acts = torch.rand(256, 2, device="cuda")
for fmt in (torch.contiguous_format, torch.channels_last):
    xi = imgs.contiguous(memory_format=fmt).requires_grad_()
    ops.crop_patches(xi, acts, 96, backend="triton").square().sum().backward()
    ops.crop_patches(xi.detach(), acts[:100], 96, index=torch.randperm(256, device="cuda")[:100], backend="triton")
torch.cuda.synchronize()
print("sanitize run ok")
PY
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 /tmp/sanitize_pointops.py 2>&1 | tail -8 | tee "$OUT/sanitizer-$tool.log"
  done
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
fi
python3 -m dynkernels bench --out "$OUT" 2>&1 | tail -40
