"""A timm ViT with ToMe token merging and mixture-of-experts MLPs: train a
few steps on random data twice -- once on dynkernels' kernels, once on the
reference paths (ToMe's full score matrix, GShard's cumsum dispatch and a
per-expert loop) -- and check that the losses agree, then time inference
against ToMe's r.

    python examples/vit_token_routing.py [--model vit_tiny_patch16_224]
        [--image 224] [--batch 8] [--steps 3] [--experts 4] [--r 0 8 16]

Prints one line per training step (both losses) and one per r (images/s).
"""

from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
import torch.nn.functional as F

from dynkernels import nn as dnn


def build(model_name, image, experts, r, backend):
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=image, num_classes=10)
    dnn.apply_moe(model, 2, num_experts=experts, k=2, upcycle=False, backend=backend)
    return dnn.apply_tome(model, r, backend=backend)


def train(model, images, labels, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels) + 0.01 * dnn.moe_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def images_per_second(model, images, repeats=3):
    model.eval()
    with torch.no_grad():
        model(images)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            best = min(best, time.perf_counter() - start)
    return images.shape[0] / best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--r", type=int, nargs="+", default=[0, 8, 16])
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    train_r = max(args.r)
    kernel = build(args.model, args.image, args.experts, train_r, None)
    reference = build(args.model, args.image, args.experts, train_r, "reference")
    ours, theirs = train(kernel, images, labels, args.steps), train(reference, images, labels, args.steps)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        print(f"step {i}: loss kernel {a:.6f}, reference {b:.6f}, same: {abs(a - b) <= 1e-4 * max(1.0, abs(b))}")
    rates = {}
    for r in args.r:
        model = copy.deepcopy(kernel)
        model.r = r
        rates[r] = images_per_second(model, images)
        print(f"r {r}: {rates[r]:.1f} images/s ({rates[r] / rates[args.r[0]]:.2f}x r = {args.r[0]})")
    return ours, theirs, rates


if __name__ == "__main__":
    main()
