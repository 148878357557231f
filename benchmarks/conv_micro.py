"""Micro-benchmark: XLA CPU vs PyTorch on the convolutions that dominate an MCL step.

Times, for each shape, forward and forward + backward (input and weight
gradients) of one NHWC convolution in JAX and the same NCHW convolution in
PyTorch, as paired alternating runs in one process (medians). Shapes are the
ResNet-50 / FPN / neck convolutions of the r50-small benchmark (64 px canvases,
43 canvases per view; layer4 and P5 are 2 x 2 maps there) plus the neck's
regions (3,655 2 x 2 regions per view for neck_regions='all', 172 for 'used';
all timed here on XLA's convolution; the library computes every conv with a
<= 2 x 2 output as a dense matmul, resnet.Conv). Use it to see where XLA's CPU
convolutions lose time; pass XLA_FLAGS in the environment to try other CPU
code paths.

  python -m benchmarks.conv_micro
  taskset -c 0 python -m benchmarks.conv_micro     # one core each (see PERFORMANCE.md)
  XLA_FLAGS=--xla_cpu_use_onednn=true python -m benchmarks.conv_micro
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# (name, N, H, C_in, C_out, k, stride)
SHAPES = [
    ('stem 7x7/2', 43, 64, 3, 64, 7, 2),
    ('layer1 3x3', 43, 16, 64, 64, 3, 1),
    ('layer1 1x1 expand', 43, 16, 64, 256, 1, 1),
    ('layer2 3x3', 43, 8, 128, 128, 3, 1),
    ('layer3 3x3', 43, 4, 256, 256, 3, 1),
    ('layer4 3x3/2 (4->2)', 43, 4, 512, 512, 3, 2),
    ('layer4 3x3 (2x2 map)', 43, 2, 512, 512, 3, 1),
    ('fpn out P2 3x3', 43, 16, 256, 256, 3, 1),
    ('fpn out P5 3x3 (2x2)', 43, 2, 256, 256, 3, 1),
    ('neck 3x3 all regions', 3655, 2, 256, 256, 3, 1),
    ('neck 3x3 used regions', 172, 2, 256, 256, 3, 1),
]


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--only', default=None, help='substring of the shape names to run')
  p.add_argument('--threads', type=int, default=None,
                 help='torch threads (default: the cores this process may use)')
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  results = []
  for name, n, h, cin, cout, k, s in SHAPES:
    if args.only and args.only not in name:
      continue
    pad = (k - 1) // 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, cin)).astype(np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) * 0.05).astype(np.float32)

    def conv(x, w):
      return jax.lax.conv_general_dilated(x, w, (s, s), ((pad, pad), (pad, pad)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    fwd = jax.jit(conv)

    @jax.jit
    def fwd_bwd(x, w):
      y, vjp = jax.vjp(conv, x, w)
      return vjp(y)
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)

    def t_fwd():
      with torch.no_grad():
        torch.nn.functional.conv2d(tx, tw, None, s, pad)

    def t_fwd_bwd():
      y = torch.nn.functional.conv2d(tx, tw, None, s, pad)
      torch.autograd.grad(y, (tx, tw), y)

    fns = {'jax_fwd': lambda: fwd(jx, jw).block_until_ready(),
           'torch_fwd': t_fwd,
           'jax_fwd_bwd': lambda: jax.block_until_ready(fwd_bwd(jx, jw)),
           'torch_fwd_bwd': t_fwd_bwd}
    for f in fns.values():
      f()
    times = {k: [] for k in fns}
    for _ in range(args.reps):
      for key in fns:
        t = time.perf_counter()
        fns[key]()
        times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ho = h // s
    flops = 2 * n * ho * ho * cin * cout * k * k
    r = {'name': name, 'shape': [n, h, cin, cout, k, s], 'gflop_fwd': flops / 1e9,
         **{k + '_ms': v * 1e3 for k, v in med.items()},
         'fwd_ratio': med['jax_fwd'] / med['torch_fwd'],
         'fwd_bwd_ratio': med['jax_fwd_bwd'] / med['torch_fwd_bwd']}
    results.append(r)
    print(f"{name:<24} {flops / 1e9:6.2f} GF  fwd JAX {r['jax_fwd_ms']:8.1f} ms torch "
          f"{r['torch_fwd_ms']:8.1f} ms ({r['fwd_ratio']:.2f}x)  fwd+bwd JAX "
          f"{r['jax_fwd_bwd_ms']:8.1f} ms torch {r['torch_fwd_bwd_ms']:8.1f} ms "
          f"({r['fwd_bwd_ratio']:.2f}x)", flush=True)
  print(f"torch threads {torch.get_num_threads()}, cores {len(os.sched_getaffinity(0))}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'xla_flags': os.environ.get('XLA_FLAGS', ''), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
