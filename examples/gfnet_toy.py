"""GFNet on a small synthetic task: train the three official stages on CPU in
a few minutes, then sweep the MSDNet budget and plot accuracy against the
measured inference time and against FLOPs (PNG).

The task: 64 x 64 noise images with one bright 16 x 16 square at a random
place; the class is the square's 1-pixel texture (flat, horizontal stripes,
vertical stripes or a checkerboard). The glance (the whole image at 24 x 24)
shows where the square is but blurs its texture away; a 24 x 24 focus patch
at full resolution sees the texture, if the policy learns to look there.

    python examples/gfnet_toy.py [--steps 600 300 200] [--batch 64] [--test 1024]
        [--budgets 10] [--out gfnet_toy.png]

Stages (GFNet's): 1 random patches, encoders + classifier trained (Adam);
2 PPO on the policy only (encoders frozen, eval mode); 3 encoders fine-tuned
with the policy's patches. Then the thresholds for each budget are
calibrated on held-out images and ``GFNet.predict`` (the real early exit)
runs the test set; prints one line per budget and writes the PNG.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dynkernels import nn as dnn
from dynkernels import ops

CLASSES, SIZE, PATCH, TEXTURE = 4, 64, 24, 16


def textures() -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(TEXTURE), torch.arange(TEXTURE), indexing="ij")
    stripes = torch.stack([torch.full_like(y, 0), y % 2, x % 2, (y + x) % 2]).float() * 2 - 1
    stripes[0] = 0
    return 1.0 + 0.8 * stripes  # bright (visible in the glance), textured (visible only at full resolution)


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    where = torch.randint(0, SIZE - TEXTURE + 1, (n, 2), generator=generator)
    pattern = textures()
    for i in range(n):  # data generation, not the model
        y, x = where[i].tolist()
        images[i, :, y : y + TEXTURE, x : x + TEXTURE] += pattern[labels[i]]
    return images, labels


class Encoder(nn.Module):
    """A small CNN returning (pooled feature, last feature map), as GFNet's backbones."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for out in (16, 24, width):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        fmap = self.body(x)
        return fmap.mean((2, 3)), fmap.detach()


def build(steps: int) -> dnn.GFNet:
    torch.manual_seed(0)
    return dnn.GFNet(
        Encoder(),
        Encoder(),
        num_classes=CLASSES,
        patch_size=PATCH,
        steps=steps,
        classifier="gru",
        policy="conv",
        global_head=nn.Linear(32, CLASSES),
        local_head=nn.Linear(32, CLASSES),
        classifier_hidden=64,
        policy_hidden=64,
    )


def batches(images, labels, batch, steps, generator):
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator)
        yield images[idx], labels[idx]


def train(model, data, steps, batch, generator):
    images, labels = data
    trained = [p for n, p in model.named_parameters() if not n.startswith(("policy.", "policy_old."))]
    for stage, count in zip((1, 2, 3), steps, strict=True):
        opt = torch.optim.Adam(trained, lr=2e-3 if stage == 1 else 5e-4)
        model.train()
        for i, (x, y) in enumerate(batches(images, labels, batch, count, generator)):
            if stage == 2:
                stats = model.ppo_step(x, y)
                value = stats["rewards"].sum(0).mean().item()
            else:
                loss, roll = model.classification_loss(x, y, stage=stage)
                opt.zero_grad()
                loss.backward()
                opt.step()
                value = loss.item()
            if (i + 1) % max(1, count // 4) == 0 or i == count - 1:
                what = "reward" if stage == 2 else "loss"
                print(f"stage {stage} step {i + 1}/{count}: {what} {value:.4f}", flush=True)


def step_flops(model) -> list[float]:
    """FLOPs of each step for one sample (the official cost model: cumulative per exit)."""
    x = torch.randn(1, 3, SIZE, SIZE)
    counts = []
    with torch.no_grad():
        for k in range(model.steps):
            with FlopCounterMode(display=False) as counter:
                if k == 0:
                    feature, fmap = model._glance(x, model.eval_glance_mode)
                    _, state = model._first(feature, True)
                    hidden = None
                else:
                    action, hidden, _ = model._act(model.policy, fmap, hidden, False)
                    feature, fmap = model._focus(x, action)
                    _, state = model.classifier.step(feature, k, state)
            counts.append(float(counter.get_total_flops()))
    return torch.tensor(counts).cumsum(0).tolist()


def timed_predict(model, images, thresholds, batch, repeats=3):
    """Predictions, exit steps and the best of `repeats` wall times for the whole set."""
    best = float("inf")
    for _ in range(repeats):
        logits, exits = [], []
        start = time.perf_counter()
        for i in range(0, images.shape[0], batch):
            r = model.predict(images[i : i + batch], thresholds)
            logits.append(r.logits)
            exits.append(r.exit_step)
        best = min(best, time.perf_counter() - start)
    return torch.cat(logits).argmax(1), torch.cat(exits), best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs=3, default=[600, 300, 200], help="iterations of stages 1, 2, 3")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--test", type=int, default=1024, help="test (and calibration) images")
    parser.add_argument("--budgets", type=int, default=10, help="budgets q = p / 20 from MSDNet's sweep")
    parser.add_argument("--glimpses", type=int, default=4, help="T (glance + focus steps)")
    parser.add_argument("--out", default="gfnet_toy.png")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    train_data = make_data(max(4 * args.batch, 2048), generator)
    calibration = make_data(args.test, generator)[0]
    test_images, test_labels = make_data(args.test, generator)

    model = build(args.glimpses)
    start = time.perf_counter()
    train(model, train_data, args.steps, args.batch, generator)
    print(f"trained in {time.perf_counter() - start:.1f} s")

    model.eval()
    flops = step_flops(model)
    probs = torch.cat([model.simulate(test_images[i : i + 256]) for i in range(0, args.test, 256)], 1)
    anytime = (probs.argmax(2) == test_labels).double().mean(1) * 100
    nobody_early = torch.tensor([1e8] * (model.steps - 1) + [-1e8])
    full_pred, _, full_time = timed_predict(model, test_images, nobody_early, 256)
    print("accuracy after each step (all steps for all):", ", ".join(f"{a:.1f}%" for a in anytime.tolist()))
    print(f"full T: accuracy {(full_pred == test_labels).double().mean() * 100:.1f}%, {full_time * 1e3:.0f} ms")

    ps = torch.linspace(1, 39, args.budgets).round().int().unique().tolist()
    rows = []
    for p in ps:
        thresholds = model.calibrate([calibration[i : i + 256] for i in range(0, args.test, 256)], q=p / 20)
        pred, exits, seconds = timed_predict(model, test_images, thresholds, 256)
        accuracy = (pred == test_labels).double().mean().item() * 100
        cost = ops.expected_cost(exits, flops).item()
        counts = torch.bincount(exits.clamp(min=0), minlength=model.steps).tolist()
        rows.append((p / 20, accuracy, seconds, cost))
        print(
            f"budget q={p / 20:.2f}: accuracy {accuracy:.1f}%, {seconds * 1e3:.0f} ms, {cost / 1e6:.2f} MFLOPs/image, exits {counts}"
        )
    plot(rows, anytime.tolist(), flops, full_time, args.out)


def plot(rows, anytime, flops, full_time, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, acc, sec, cost = zip(*rows, strict=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([s * 1e3 for s in sec], acc, "o-", label="GFNet.predict (real early exit)")
    a.axvline(full_time * 1e3, color="gray", ls="--", label="all steps for all")
    a.set_xlabel("measured time for the test set (ms)")
    a.set_ylabel("accuracy (%)")
    a.legend()
    b.plot([c / 1e6 for c in cost], acc, "o-", label="budget sweep")
    b.plot([f / 1e6 for f in flops], anytime, "s--", label="fixed number of steps")
    b.set_xlabel("MFLOPs per image")
    b.legend()
    fig.suptitle("GFNet on the synthetic texture task")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
