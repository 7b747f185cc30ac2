"""Auto Seg-Loss on a tiny synthetic segmentation task, on CPU in a few minutes.

Images hold a few shapes (discs, squares, bars: 3 classes + background) on a
noisy background; a small fully-convolutional segmenter predicts a label per
pixel. The script

1. searches an mIoU surrogate with ``dynkernels.nn.search_surrogate`` (the
   paper's PPO search, scaled down: each sampled curve trains a proxy model a
   few steps and is rewarded with the proxy's validation mIoU),
2. trains the same segmenter from the same initialisation with
   cross-entropy, with the searched surrogate, and with the official mIoU
   preset, and
3. reports each one's mIoU on held-out images.

Usage: python examples/auto_seg_loss.py [--steps 300] [--search-rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from dynkernels import nn as dnn

CLASSES = 4


def make_images(count: int, size: int, generator: torch.Generator):
    """(count, 3, size, size) images in [-1, 1] and (count, size, size) labels;
    a ring of ignored pixels (255) around each shape, as annotation borders."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.randn(count, 3, size, size, generator=generator) * 0.35
    labels = torch.zeros(count, size, size, dtype=torch.long)
    colours = torch.tensor([[0.0, 0.0, 0.0], [0.9, -0.5, -0.3], [-0.4, 0.8, -0.2], [-0.3, -0.2, 0.9]])
    for i in range(count):
        for _ in range(int(torch.randint(2, 5, (1,), generator=generator))):
            cls = int(torch.randint(1, CLASSES, (1,), generator=generator))
            cy, cx = (torch.rand(2, generator=generator) * size).tolist()
            r = float(torch.rand(1, generator=generator)) * size / 6 + size / 14
            if cls == 1:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif cls == 2:
                inside = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            else:
                inside = ((yy - cy).abs() <= r / 3) & ((xx - cx).abs() <= 1.6 * r)
            ring = F.max_pool2d(inside[None, None].float(), 3, 1, 1)[0, 0].bool() & ~inside
            labels[i][ring] = 255
            labels[i][inside] = cls
            images[i][:, inside] += colours[cls].view(3, 1) * 0.8
    return images.clamp(-1, 1), labels


class Segmenter(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(width, CLASSES, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def miou(model: nn.Module, images, labels) -> float:
    with torch.no_grad():
        pred = model(images).argmax(1)
    valid = labels != 255
    ious = []
    for c in range(CLASSES):
        p, t = (pred == c) & valid, (labels == c) & valid
        union = (p | t).sum()
        if union > 0:
            ious.append(float((p & t).sum()) / float(union))
    return 100.0 * sum(ious) / len(ious)


def train(loss_fn, init_state, data, steps: int, batch: int, generator: torch.Generator) -> nn.Module:
    images, labels = data
    model = Segmenter()
    model.load_state_dict(init_state)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator)
        loss = loss_fn(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each final model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--proxy-steps", type=int, default=60, help="training steps of each search proxy")
    parser.add_argument("--search-rounds", type=int, default=3)
    parser.add_argument("--search-samples", type=int, default=6)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train_set = make_images(args.train, args.size, g)
    val_set = make_images(args.test // 2, args.size, g)
    test_set = make_images(args.test, args.size, g)
    init_state = Segmenter().state_dict()
    ce = lambda z, t: F.cross_entropy(z, t, ignore_index=255)  # noqa: E731

    # 1. the search: each sampled curve pair trains a proxy, rewarded by its validation mIoU
    start = time.perf_counter()

    def reward(points: torch.Tensor) -> float:
        loss = dnn.SurrogateSegLoss("miou", points)
        proxy = train(loss, init_state, train_set, args.proxy_steps, args.batch, torch.Generator().manual_seed(1))
        return miou(proxy, *val_set) / 100

    result = dnn.search_surrogate(
        reward,
        metric="miou",
        rounds=args.search_rounds,
        samples=args.search_samples,
        updates=20,
        generator=torch.Generator().manual_seed(2),
    )
    for k, round_ in enumerate(result.history):
        rewards = round_["rewards"]
        print(f"search round {k}: proxy mIoU mean {100 * rewards.mean():.1f}% best {100 * rewards.max():.1f}% "
              f"(mu's curve {100 * rewards[0]:.1f}%)")  # fmt: skip
    print(f"searched theta: {[round(v, 4) for v in result.theta.tolist()]} ({time.perf_counter() - start:.0f} s)")

    # 2. the final models, from one initialisation and one batch order
    losses = {
        "cross-entropy": ce,
        "searched mIoU surrogate": dnn.SurrogateSegLoss("miou", result.theta),
        "official mIoU preset": dnn.SurrogateSegLoss("miou"),
    }
    for name, loss_fn in losses.items():
        start = time.perf_counter()
        model = train(loss_fn, init_state, train_set, args.steps, args.batch, torch.Generator().manual_seed(3))
        print(f"{name}: test mIoU {miou(model, *test_set):.1f}% ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
