"""Spatially sparse MobileNetV2 blocks with DynConv mask units: train a few
steps on random data (the masked-dense formulation, task loss plus DynConv's
sparsity loss), then time inference against density (the sparse path against
the same blocks run densely).

    python examples/sparse_mobilenet.py [--steps 4] [--batch 8] [--size 112]

Prints the training losses and, per density, the sparse and dense inference
times of the block stack; returns them (``main([...])``) for the test.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from dynkernels import nn as dnn
from dynkernels import ops


class SparseNet(nn.Module):
    """A stem, three sparse inverted residuals (24 channels, expansion 6), a classifier."""

    def __init__(self, classes: int = 10, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.blocks = nn.ModuleList(dnn.SparseInvertedResidual(24, 6) for _ in range(blocks))
        self.head = nn.Linear(24, classes)

    def features(self, x, tau=1.0):
        x = self.stem(x)
        infos = []
        for block in self.blocks:
            x, info = block(x, tau)
            infos.append(info)
        return x, infos

    def forward(self, x, tau=1.0):
        x, infos = self.features(x, tau)
        return self.head(x.mean((2, 3))), infos


def _time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--target", type=float, default=0.25, help="the sparsity loss's FLOP budget")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    net = SparseNet()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 10, (args.batch,))
    losses = []
    net.train()
    for step in range(args.steps):
        logits, infos = net(images)
        task = F.cross_entropy(logits, labels)
        budget = ops.sparsity_loss(
            [i["mask"] for i in infos],
            [i["dilated"].to(images.dtype) for i in infos],
            [i["flops"] for i in infos],
            target=args.target,
            epoch=step,
            num_epochs=max(args.steps, 1),
        )
        loss = task + budget
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append((float(task.detach()), float(budget.detach())))
        print(f"step {step}: task loss {losses[-1][0]:.4f}, sparsity loss {losses[-1][1]:.4f}")

    # inference time against density: each block's mask bias shifted to the target density
    net.eval()
    with torch.no_grad():
        stem = net.stem(images)
    rows = []
    for density in (1.0, 0.5, 0.25, 0.1):
        with torch.no_grad():
            saved = [b.masker.maskconv.bias.clone() for b in net.blocks]
            x = stem
            for block in net.blocks:  # calibrate on this input, block by block
                logits = block.masker.maskconv(x).flatten()
                shift = torch.quantile(logits, 1 - density) if density < 1 else logits.min() - 1
                block.masker.maskconv.bias -= shift
                x = block(x)[0]

            def run(sparse):
                def call():
                    y = stem
                    for block in net.blocks:
                        block.sparse = sparse
                        y = block(y)[0]
                    return y

                return call

            same = torch.allclose(run(True)(), run(False)(), rtol=1e-4, atol=1e-4)
            sparse_s, dense_s = _time(run(True)), _time(run(False))
            for block, bias in zip(net.blocks, saved, strict=True):
                block.masker.maskconv.bias.copy_(bias)
        rows.append(dict(density=density, sparse_ms=sparse_s * 1e3, masked_dense_ms=dense_s * 1e3, same=same))
        print(
            f"density {density:4.2f}: sparse {sparse_s * 1e3:7.2f} ms, masked-dense {dense_s * 1e3:7.2f} ms, "
            f"speedup {dense_s / sparse_s:4.2f}x, same output: {same}"
        )
    return dict(losses=losses, inference=rows)


if __name__ == "__main__":
    main()
