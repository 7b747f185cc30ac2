"""GFNet and EarlyExitCascade against float64 transcriptions of GFNet's
official code (network.py's ActorCritic / PPO / Full_layer, train.py's
stage loops, inference.py's generate_logits), in our own words: the
evaluation's probabilities, the stage-1 / stage-3 losses and gradients, one
PPO update, and ``predict`` (the real early exit) against ``simulate`` +
thresholds for every sample, with B = 1, everyone exiting at the glance,
nobody before the last step, and a last threshold some samples miss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels import nn as dnn
from dynkernels import ops


class TinyEncoder(nn.Module):
    """(pooled feature, last feature map), as the official backbones return."""

    def __init__(self, width=6):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
        )

    def forward(self, x):
        fmap = torch.relu(self.body(x))
        return fmap.mean((2, 3)), fmap.detach()


def _model(classifier="gru", policy="mlp", steps=4, first_exit="classifier", seed=0, **kw):
    torch.manual_seed(seed)
    heads = dict(global_head=nn.Linear(6, 5), local_head=nn.Linear(6, 5))
    model = dnn.GFNet(
        TinyEncoder(),
        TinyEncoder(),
        num_classes=5,
        patch_size=12,
        steps=steps,
        classifier=classifier,
        policy=policy,
        classifier_hidden=7,
        policy_hidden=8,
        eval_first_exit=first_exit,
        **heads,
        **kw,
    )
    return model.double()


def _data(b=6, s=28, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, s, s, generator=g, dtype=torch.float64), torch.randint(0, 5, (b,), generator=g)


# ---- the official code, transcribed ----------------------------------------------------------------------------------
def _get_patch(images, action, p):
    size = images.size(2)
    corner = torch.floor(action * (size - p)).int()
    return torch.cat(
        [
            images[
                i : i + 1,
                :,
                corner[i, 0].item() : corner[i, 0].item() + p,
                corner[i, 1].item() : corner[i, 1].item() + p,
            ]
            for i in range(images.size(0))
        ]
    )


class _FullLayer:
    """Full_layer.forward's control flow on the module's weights."""

    def __init__(self, clf):
        self.clf, self.hidden = clf, None

    def __call__(self, x, restart):
        c = self.clf
        if c.kind == "gru":
            h0 = torch.zeros(1, x.size(0), c.hidden, dtype=x.dtype) if restart else self.hidden
            out, self.hidden = c.rnn(x.view(1, x.size(0), x.size(1)), h0)
            return c.fc(out[0])
        self.hidden = x if restart else torch.cat([self.hidden, x], 1)
        k = self.hidden.size(1) // c.feature_dim
        return None if k == 1 else getattr(c, f"fc_{k}")(self.hidden)


def _act(policy, state, hidden, training, gen=None):
    """ActorCritic.act: (action, hidden, logprob)."""
    s = policy.state_encoder(state if policy.kind == "conv" else state.flatten(1))
    out, hidden = policy.gru(s.view(1, s.size(0), s.size(1)), hidden)
    mean = policy.actor(out[0])
    dist = torch.distributions.MultivariateNormal(
        mean, scale_tril=torch.diag(torch.full((2,), policy.action_std, dtype=mean.dtype))
    )
    if not training:
        return mean, hidden, None
    action = dist.sample()
    action = F.relu(action)
    action = 1 - F.relu(1 - action)
    return action, hidden, dist.log_prob(action)


def _official_probs(model, images, mode, first):
    """inference.py generate_logits: softmax of every step, all steps for all samples."""
    fc = _FullLayer(model.classifier)
    output, state = model.global_encoder(F.interpolate(images, size=[12, 12], mode=mode, align_corners=True))
    if first == "classifier" and model.classifier.kind == "gru":
        output = fc(output, restart=True)
    else:  # MobileNetV3 / EfficientNet, and RegNet at evaluation
        _ = fc(output, restart=True)
        output = model.global_head(output)
    probs = [F.softmax(output, 1)]
    hidden = torch.zeros(1, images.size(0), model.policy.hidden, dtype=images.dtype)
    for _ in range(1, model.steps):
        action, hidden, _ = _act(model.policy, state, hidden, training=False)
        output, state = model.local_encoder(_get_patch(images, action, 12))
        probs.append(F.softmax(fc(output, restart=False), 1))
    return torch.stack(probs)


def _official_loss(model, images, targets, stage):
    """train.py's loop for stages 1 and 3 (train_model_prime on), one batch."""
    fc = _FullLayer(model.classifier)
    output, state = model.global_encoder(F.interpolate(images, size=[12, 12], mode="bicubic", align_corners=True))
    dsn = [model.global_head(output)]
    if model.classifier.kind == "gru":
        logits = [fc(output, restart=True)]
    else:
        _ = fc(output, restart=True)
        logits = [model.global_head(output)]
    hidden = torch.zeros(1, images.size(0), model.policy.hidden, dtype=images.dtype)
    for _ in range(1, model.steps):
        if stage == 1:
            action = torch.rand(images.size(0), 2)
        else:
            with torch.no_grad():
                action, hidden, _ = _act(model.policy_old, state, hidden, training=True)
        output, state = model.local_encoder(_get_patch(images, action, 12))
        dsn.append(model.local_head(output))
        logits.append(fc(output, restart=False))
    loss_cla = sum(F.cross_entropy(z, targets) for z in logits)
    loss_dsn = sum(F.cross_entropy(z, targets) for z in dsn)
    return (loss_cla + 1.0 * loss_dsn) / model.steps


def _official_ppo(model, images, targets, optimizer):
    """train.py stage 2 + PPO.update (gamma 0.7, clip 0.2, K_epochs 1)."""
    for m in (model.global_encoder, model.local_encoder, model.classifier):
        m.eval()
    memory = {"states": [], "actions": [], "logprobs": [], "rewards": []}
    with torch.no_grad():
        fc = _FullLayer(model.classifier)
        output, state = model.global_encoder(F.interpolate(images, size=[12, 12], mode="bicubic", align_corners=True))
        output = (
            fc(output, restart=True)
            if model.classifier.kind == "gru"
            else (fc(output, True), model.global_head(output))[1]
        )
        last = torch.gather(F.softmax(output, 1), 1, targets.view(-1, 1)).view(1, -1)
        hidden = torch.zeros(1, images.size(0), model.policy.hidden, dtype=images.dtype)
        for _ in range(1, model.steps):
            state_ini = state
            action, hidden, logprob = _act(model.policy_old, state, hidden, training=True)
            memory["states"].append(state_ini)
            memory["actions"].append(action)
            memory["logprobs"].append(logprob)
            output, state = model.local_encoder(_get_patch(images, action, 12))
            conf = torch.gather(F.softmax(fc(output, restart=False), 1), 1, targets.view(-1, 1)).view(1, -1)
            memory["rewards"].append(conf - last)
            last = conf
    rewards, discounted = [], 0
    for reward in reversed(memory["rewards"]):
        discounted = reward + 0.7 * discounted
        rewards.insert(0, discounted)
    rewards = torch.cat(rewards, 0)
    rewards = (rewards - rewards.mean()) / (rewards.std() + 1e-5)
    states = torch.stack(memory["states"], 0)
    actions = torch.stack(memory["actions"], 0)
    old_logprobs = torch.stack(memory["logprobs"], 0)
    policy = model.policy
    seq, b = states.shape[:2]
    s = states.view(seq * b, *states.shape[2:])
    s = policy.state_encoder(s if policy.kind == "conv" else s.flatten(1)).view(seq, b, -1)
    out, _ = policy.gru(s, torch.zeros(1, b, s.size(2), dtype=s.dtype))
    out = out.view(seq * b, -1)
    mean = policy.actor(out)
    dist = torch.distributions.MultivariateNormal(mean, scale_tril=torch.diag(torch.full((2,), 0.1, dtype=mean.dtype)))
    logprobs = dist.log_prob(torch.squeeze(actions.view(seq * b, -1))).view(seq, b)
    entropy = dist.entropy().view(seq, b)
    values = policy.critic(out).view(seq, b)
    ratios = torch.exp(logprobs - old_logprobs.detach())
    advantages = rewards - values.detach()
    surr1, surr2 = ratios * advantages, torch.clamp(ratios, 0.8, 1.2) * advantages
    loss = -torch.min(surr1, surr2) + 0.5 * F.mse_loss(values, rewards) - 0.01 * entropy
    optimizer.zero_grad()
    loss.mean().backward()
    optimizer.step()
    model.policy_old.load_state_dict(policy.state_dict())
    return loss.mean().detach()


# ---- the tests ---------------------------------------------------------------------------------------------------------
CONFIGS = [("gru", "mlp", "classifier"), ("gru", "conv", "encoder"), ("fc", "conv", "classifier")]


@pytest.mark.parametrize("classifier,policy,first", CONFIGS)
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_simulate_equals_the_official_evaluation(classifier, policy, first, mode):
    model = _model(classifier, policy, first_exit=first, eval_glance_mode=mode).eval()
    images, _ = _data()
    torch.testing.assert_close(
        model.simulate(images), _official_probs(model, images, mode, first), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("classifier,policy,first", CONFIGS)
@pytest.mark.parametrize("stage", [1, 3])
def test_stage_losses_and_gradients_equal_the_official_loop(classifier, policy, first, stage):
    ours = _model(classifier, policy, first_exit=first)
    theirs = copy.deepcopy(ours)
    images, targets = _data()
    torch.manual_seed(5)
    loss, roll = ours.classification_loss(images, targets, stage=stage)
    loss.backward()
    torch.manual_seed(5)
    expected = _official_loss(theirs, images, targets, stage)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert roll["actions"].shape == (3, 6, 2)
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert grads
    for name, p in ours.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-10, atol=1e-13, msg=name)
        else:
            assert p.grad is None or not p.grad.any(), name


@pytest.mark.parametrize("classifier,policy", [("gru", "mlp"), ("fc", "conv")])
def test_ppo_step_equals_the_official_update(classifier, policy):
    ours = _model(classifier, policy)
    theirs = copy.deepcopy(ours)
    images, targets = _data(b=5)
    torch.manual_seed(11)
    stats = ours.ppo_step(images, targets)
    torch.manual_seed(11)
    optimizer = torch.optim.Adam(theirs.policy.parameters(), lr=3e-4, betas=(0.9, 0.999))
    expected = _official_ppo(theirs, images, targets, optimizer)
    torch.testing.assert_close(stats["loss"], expected, rtol=1e-10, atol=1e-13)
    assert stats["rewards"].shape == (3, 5)
    for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    assert all(not p.requires_grad for p in ours.policy_old.parameters())
    with torch.no_grad():
        ours.policy.actor[0].bias.add_(1.0)
    ours.sync_acting_policy()
    assert torch.equal(ours.policy_old.actor[0].bias, ours.policy.actor[0].bias)
    torch.testing.assert_close(ours.policy_old.actor[0].weight, ours.policy.actor[0].weight, rtol=0, atol=0)


def _thresholds_between(confidence, q):
    """Budget thresholds nudged down by 1e-9 so a sample exactly at its
    threshold still exits after the compacted batch's last-ulp differences."""
    thr = ops.budget_thresholds(confidence, q=q)
    return torch.where(thr.abs() < 1e7, thr - 1e-9, thr)


@pytest.mark.parametrize("classifier,policy,first", CONFIGS)
@pytest.mark.parametrize("q", [0.3, 1.0, 1.9])
def test_predict_gives_the_simulated_exits_for_every_sample(classifier, policy, first, q):
    model = _model(classifier, policy, first_exit=first).eval()
    images, _ = _data(b=16, seed=3)
    probs = model.simulate(images)
    thr = _thresholds_between(probs.amax(2), q)
    result = model.predict(images, thr)
    stage = ops.exit_stage(probs.amax(2), thr)
    assert torch.equal(result.exit_step, stage)
    at_exit = probs.gather(0, stage[None, :, None].expand(1, -1, 5))[0]
    assert torch.equal(result.predictions, at_exit.argmax(1))
    torch.testing.assert_close(F.softmax(result.logits, 1), at_exit, rtol=1e-12, atol=1e-14)
    counts = torch.bincount(stage, minlength=model.steps)
    assert torch.equal(result.active, 16 - torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]]))
    assert result.expected_cost([1.0, 2.0, 3.0, 4.0]) == ops.expected_cost(stage, [1.0, 2.0, 3.0, 4.0])


def test_predict_edge_paths():
    model = _model().eval()
    images, _ = _data(b=5, seed=4)
    probs = model.simulate(images)
    everyone_first = torch.tensor([-1e8] * 4, dtype=torch.float64)
    r = model.predict(images, everyone_first)
    assert (r.exit_step == 0).all() and r.active.tolist() == [5, 0, 0, 0]
    torch.testing.assert_close(F.softmax(r.logits, 1), probs[0], rtol=1e-12, atol=1e-14)
    nobody_early = torch.tensor([1e8, 1e8, 1e8, -1e8], dtype=torch.float64)
    r = model.predict(images, nobody_early)
    assert (r.exit_step == 3).all() and r.active.tolist() == [5, 5, 5, 5]
    torch.testing.assert_close(F.softmax(r.logits, 1), probs[3], rtol=1e-12, atol=1e-14)
    missing = torch.tensor([1e8, 1e8, 1e8, 2.0], dtype=torch.float64)  # nobody reaches the last threshold
    r = model.predict(images, missing)
    assert (r.exit_step == -1).all() and torch.equal(r.exit_step, ops.exit_stage(probs.amax(2), missing))
    one = model.predict(images[:1], _thresholds_between(probs.amax(2), 1.0))
    assert one.exit_step.shape == (1,)
    with pytest.raises(ValueError, match="thresholds must be"):
        model.predict(images, torch.zeros(3))
    with pytest.raises(RuntimeError, match="eval"):
        model.train().predict(images, everyone_first)


def test_calibrate_equals_the_thresholds_of_the_simulated_confidences():
    model = _model(steps=3).eval()
    batches = [_data(b=7, seed=s) for s in range(3)]
    confidence = torch.cat([model.simulate(x).amax(2) for x, _ in batches], 1)
    assert torch.equal(model.calibrate(batches, q=0.5), ops.budget_thresholds(confidence, q=0.5))


def test_gfnet_bad_arguments():
    enc = TinyEncoder()
    with pytest.raises(ValueError, match="global_head"):
        dnn.GFNet(enc, enc, num_classes=5, patch_size=12, classifier="fc")
    with pytest.raises(ValueError, match="eval_first_exit"):
        dnn.GFNet(enc, enc, num_classes=5, patch_size=12, eval_first_exit="head")
    with pytest.raises(ValueError, match="classifier must be"):
        dnn.GFNet(enc, enc, num_classes=5, patch_size=12, classifier="lstm")
    with pytest.raises(ValueError, match="policy must be"):
        dnn.GFNet(enc, enc, num_classes=5, patch_size=12, policy="rnn")
    with pytest.raises(ValueError, match="glance modes"):
        dnn.GFNet(enc, enc, num_classes=5, patch_size=12, glance_mode="nearest")
    model = _model()
    with pytest.raises(ValueError, match="stages 1 and 3"):
        model.classification_loss(*_data(), stage=2)


def test_gfnet_loads_the_official_state_dict_names():
    names = set(_model("gru", "mlp").policy.state_dict()) | {
        "c." + n for n in _model("fc", "conv").classifier.state_dict()
    }
    assert {
        "state_encoder.0.weight",
        "state_encoder.2.weight",
        "gru.weight_ih_l0",
        "actor.0.weight",
        "critic.0.bias",
    } <= names
    assert {"c.fc_2.weight", "c.fc_4.bias"} <= names
    assert {"rnn.weight_hh_l0", "fc.weight"} <= set(_model("gru").classifier.state_dict())


def _cascade():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]
    heads = [nn.Linear(6, 4) for _ in range(3)]
    return dnn.EarlyExitCascade(stages, heads).double().eval()


class _TwoScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = x if isinstance(x, torch.Tensor) else x[0] + x[1].sum(1, keepdim=True)
        return [torch.tanh(self.a(x)), torch.tanh(self.b(x))]


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(9, 4)

    def forward(self, x):
        return self.fc(torch.cat(x, 1))


@pytest.mark.parametrize("multi_scale", [False, True])
def test_cascade_predict_equals_simulate(multi_scale):
    if multi_scale:
        torch.manual_seed(0)
        model = dnn.EarlyExitCascade([_TwoScale() for _ in range(3)], [_Head() for _ in range(3)]).double().eval()
    else:
        model = _cascade()
    x = torch.randn(40, 6, dtype=torch.float64)
    probs = model.simulate(x)
    thr = _thresholds_between(probs.amax(2), 0.8)
    r = model.predict(x, thr)
    stage = ops.exit_stage(probs.amax(2), thr)
    assert torch.equal(r.exit_step, stage)
    assert torch.equal(r.predictions, probs.argmax(2).gather(0, stage[None])[0])
    assert torch.equal(model.calibrate([x[:20], (x[20:], None)], q=0.8), ops.budget_thresholds(probs.amax(2), q=0.8))
    with pytest.raises(ValueError, match="one length"):
        dnn.EarlyExitCascade([nn.Identity()], [])
