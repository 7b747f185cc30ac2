"""Early exit (issue 16): GFNet (glance and focus, arXiv 2010.05300) and
MSDNet / RANet-style multi-exit cascades, with an inference that really stops.

* :class:`GFNet` wraps two user-supplied encoders that return ``(pooled
  feature (B, F), last feature map (B, C, h, w))``, as the official code's
  ResNet / DenseNet / RegNet / MobileNetV3 / EfficientNet do. Step 0 sees the
  glance (the whole image resized to P x P), steps 1..T-1 a P x P focus patch
  chosen by the PPO policy from the previous step's feature map. The
  classifier is a GRU + FC ("gru": ResNet, DenseNet, RegNet) or one FC per
  sequence length on the concatenated features ("fc": MobileNetV3,
  EfficientNet; step 0 then uses the global encoder's own head). Module and
  parameter names follow the official ``ActorCritic`` / ``Full_layer``, so
  their state dicts load.
  - Training: ``classification_loss(images, targets, stage=1 | 3)`` (stage 1:
    random actions; stage 3: actions sampled from the policy), the official
    ``(sum_t CE_t + dsn_ratio sum_t CE(head(feature_t))) / T``;
    ``ppo_step(images, targets)`` (stage 2: encoders and classifier frozen in
    eval mode, actions sampled with std 0.1 and clamped to [0, 1], reward
    ``p_t(y) - p_{t-1}(y)``, returns discounted by gamma 0.7 and standardised,
    one PPO epoch with clip 0.2 and loss ``-min(surr) + 0.5 MSE(V) - 0.01
    entropy``, Adam 3e-4, then the acting policy copied from the trained one).
  - ``simulate(images)``: the official evaluation, every step for every
    sample, softmax probabilities (T, B, K); thresholds are applied afterwards.
  - ``predict(images, thresholds)``: the real early exit. After each step the
    samples whose confidence (max softmax) reaches the step's threshold stop;
    the others are compacted (feature maps, GRU states, accumulated features)
    and only they run the next step, their patches cut straight from the full
    image batch. Same predictions and exit steps as ``simulate`` + thresholds.
  - ``calibrate(batches, q=...)``: the MSDNet/GFNet budget thresholds from the
    simulated confidences of a calibration set.
* :class:`EarlyExitCascade(stages, heads)`: ``x_{k+1} = stages[k](x_k)``,
  exit k's logits ``heads[k](x_{k+1})`` (a state may be a tensor or a
  tuple / list of tensors with the batch first, e.g. MSDNet's scales); the
  same ``simulate`` / ``predict`` / ``calibrate``.

Differences from the official code (documented, see docs/early_exit.md):
the crop uses H for y and W for x (the official code uses H for both, the
same on square images); ``simulate`` and ``predict`` need ``.eval()``; the
glance's mode is ``glance_mode`` in training and ``eval_glance_mode`` in
evaluation (official: bicubic in training; bilinear in evaluation for
DenseNet and RegNet); ``eval_first_exit="encoder"`` reproduces the official
RegNet evaluation, which classifies step 0 with the global encoder's head
although training used the GRU classifier there (the "fc" classifier always
uses the head at step 0, as the official MobileNetV3 / EfficientNet)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops._validation import check_tensor

__all__ = ["EarlyExitCascade", "EarlyExitResult", "GFNet", "GFNetClassifier", "GFNetPolicy", "TimmEncoder"]


@dataclass
class EarlyExitResult:
    """What :meth:`predict` measured.

    logits (B, K) at each sample's exit step; predictions (B,); exit_step (B,)
    int64 (-1 where even the last threshold was not reached: the official
    evaluation skips such a sample; its logits are the last step's);
    confidence (B,) the max softmax at exit; active (T,) how many samples ran
    each step; seconds (T,) each step's wall time (the compaction's host sync
    closes each step, so GPU time is included)."""

    logits: torch.Tensor
    predictions: torch.Tensor
    exit_step: torch.Tensor
    confidence: torch.Tensor
    active: torch.Tensor
    seconds: torch.Tensor

    def expected_cost(self, stage_costs) -> torch.Tensor:
        """``sum_k (n_k / B) cost_k`` with n_k the samples exiting at k (the
        official expected FLOPs when cost_k is the FLOPs up to exit k)."""
        return ops.expected_cost(self.exit_step, stage_costs)


def _run_early_exit(steps, step, state, dims, batch, thresholds, device) -> EarlyExitResult:
    """The shared loop: ``step(k, rows, state) -> (logits (n, K), state)``;
    ``state`` a tuple of tensors (or None) with their batch dims ``dims``
    (None: all 0); ``rows`` the original indices of the active samples."""
    thresholds = check_tensor("thresholds", thresholds)
    if thresholds.shape != (steps,):
        raise ValueError(f"thresholds must be (T = {steps},), got {tuple(thresholds.shape)}")
    thresholds = thresholds.to(device)
    rows = torch.arange(batch, device=device)
    exit_step = torch.full((batch,), -1, dtype=torch.int64, device=device)
    active = torch.zeros(steps, dtype=torch.int64)
    seconds = torch.zeros(steps, dtype=torch.float64)
    logits_out = confidence = None
    for k in range(steps):
        start = time.perf_counter()
        logits, state = step(k, rows, state)
        conf = F.softmax(logits, 1).amax(1)
        if logits_out is None:
            logits_out = logits.new_empty(batch, logits.shape[1])
            confidence = conf.new_empty(batch)
        done = conf >= thresholds[k].to(conf.dtype)
        ops.expand_results(logits_out, rows, logits, inplace=True)  # later steps overwrite the rows that go on
        ops.expand_results(confidence, rows, conf, inplace=True)
        ops.expand_results(exit_step, rows, torch.where(done, k, -1), inplace=True)
        active[k] = rows.numel()
        if k < steps - 1:
            state_dims = (0,) * len(state) if dims is None else dims
            _, rows, *state = ops.compact_active(~done, rows, *state, dims=(0, *state_dims))
        seconds[k] = time.perf_counter() - start
        if rows.numel() == 0:
            break
    return EarlyExitResult(logits_out, logits_out.argmax(1), exit_step, confidence, active, seconds)


def _calibrate(simulate: Callable, batches, q, proportions, sentinel) -> torch.Tensor:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    confidence = []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        confidence.append(simulate(x).amax(2))
    if not confidence:
        raise ValueError("calibrate needs at least one batch")
    return ops.budget_thresholds(torch.cat(confidence, 1), proportions, q=q, sentinel=sentinel)


def _require_eval(module: nn.Module, what: str) -> None:
    if module.training:
        raise RuntimeError(f"{what} evaluates the model: call .eval() first (batch norm statistics, dropout)")


class TimmEncoder(nn.Module):
    """A timm classifier as a GFNet encoder: (pre-logits feature, last
    feature map detached); the model's own classifier stays unused here (pass
    ``model.get_classifier()`` as the head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        fmap = self.model.forward_features(x)
        return self.model.forward_head(fmap, pre_logits=True), fmap.detach()


class GFNetPolicy(nn.Module):
    """GFNet's actor-critic (official ``ActorCritic``): a state encoder on the
    previous step's feature map (C, h, w) -- ``"mlp"``: Linear(C h w, 2048),
    ReLU, Linear(2048, hidden), ReLU (ResNet, DenseNet); ``"conv"``: a 1x1
    conv to 32 channels, ReLU, Linear(32 h w, hidden), ReLU (MobileNetV3,
    EfficientNet, RegNet) -- a GRU, the actor Linear(hidden, 2) + Sigmoid
    (the mean of a Gaussian with std ``action_std``) and the critic
    Linear(hidden, 1)."""

    def __init__(self, state_shape: Sequence[int], hidden: int = 1024, kind: str = "mlp", action_std: float = 0.1):
        super().__init__()
        if kind not in ("mlp", "conv"):
            raise ValueError(f"policy must be 'mlp' or 'conv', got {kind!r}")
        c, h, w = (int(v) for v in state_shape)
        if kind == "conv":
            self.state_encoder = nn.Sequential(
                nn.Conv2d(c, 32, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(32 * h * w, hidden), nn.ReLU()
            )
        else:
            self.state_encoder = nn.Sequential(
                nn.Linear(c * h * w, 2048), nn.ReLU(), nn.Linear(2048, hidden), nn.ReLU()
            )
        self.gru = nn.GRU(hidden, hidden)
        self.actor = nn.Sequential(nn.Linear(hidden, 2), nn.Sigmoid())
        self.critic = nn.Sequential(nn.Linear(hidden, 1))
        self.kind, self.hidden, self.action_std = kind, hidden, float(action_std)

    def _encode(self, state: torch.Tensor) -> torch.Tensor:
        return self.state_encoder(state if self.kind == "conv" else state.flatten(1))

    def step(self, state: torch.Tensor, hidden: torch.Tensor | None):
        """One step: (action mean (B, 2), GRU output (B, hidden), new hidden (1, B, hidden))."""
        x = self._encode(state)
        if hidden is None:
            hidden = x.new_zeros(1, x.shape[0], self.hidden)
        out, hidden = self.gru(x[None], hidden)
        return self.actor(out[0]), out[0], hidden

    def log_prob(self, mean: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log N(action; mean, std^2 I) summed over the two coordinates."""
        std = self.action_std
        return (-0.5 * ((action - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> float:
        return 2 * (0.5 + 0.5 * math.log(2 * math.pi) + math.log(self.action_std))

    def evaluate(self, states: torch.Tensor, actions: torch.Tensor):
        """The official ``evaluate``: states (L, B, C, h, w), actions (L, B, 2)
        -> (log-probabilities (L, B), values (L, B), entropy (L, B)), the GRU
        rerun from a zero state over the L steps."""
        seq, b = states.shape[:2]
        x = self._encode(states.reshape(seq * b, *states.shape[2:])).reshape(seq, b, -1)
        out, _ = self.gru(x, x.new_zeros(1, b, self.hidden))
        mean = self.actor(out)
        values = self.critic(out)[..., 0]
        return self.log_prob(mean, actions), values, torch.full_like(values, self.entropy())


class GFNetClassifier(nn.Module):
    """GFNet's classifier (official ``Full_layer``): ``"gru"``: GRU(F, hidden)
    + Linear(hidden, K) at every step; ``"fc"``: at step k >= 1 the
    concatenated features of steps 0..k through ``fc_{k+1}`` (Linear((k+1) F,
    K)); step 0 has no FC of its own (GFNet uses the global encoder's head)."""

    def __init__(self, feature_dim: int, num_classes: int, steps: int, kind: str = "gru", hidden: int = 1024):
        super().__init__()
        if kind not in ("gru", "fc"):
            raise ValueError(f"classifier must be 'gru' or 'fc', got {kind!r}")
        self.kind, self.hidden, self.feature_dim = kind, hidden, feature_dim
        if kind == "gru":
            self.rnn = nn.GRU(feature_dim, hidden)
            self.fc = nn.Linear(hidden, num_classes)
        else:
            for k in range(2, steps + 1):
                self.add_module(f"fc_{k}", nn.Linear(feature_dim * k, num_classes))

    @property
    def state_dim(self) -> int:
        """The batch dim of the step state: 1 for the GRU's (1, B, H) hidden, 0 for the features."""
        return 1 if self.kind == "gru" else 0

    def step(self, feature: torch.Tensor, k: int, state: torch.Tensor | None):
        """Step k: (logits (B, K), or None at step 0 of "fc"; the new state)."""
        if self.kind == "gru":
            if k == 0:
                state = feature.new_zeros(1, feature.shape[0], self.hidden)
            out, state = self.rnn(feature[None], state)
            return self.fc(out[0]), state
        state = feature if k == 0 else torch.cat([state, feature], 1)
        return (None if k == 0 else getattr(self, f"fc_{k + 1}")(state)), state


class GFNet(nn.Module):
    """See the module docstring.

    Arguments: ``global_encoder`` / ``local_encoder`` map images (B, 3, P, P)
    to (feature (B, F), feature map (B, C, h, w)); ``num_classes``;
    ``patch_size`` P (96, 128 or 144 officially); ``steps`` T (5 for ResNet,
    DenseNet, RegNet; 3 for MobileNetV3; 4 for EfficientNet); ``classifier``
    "gru" | "fc"; ``policy`` "mlp" | "conv"; ``global_head`` / ``local_head``
    the encoders' own classifiers (F -> K) for the deep-supervision loss
    (``dsn_ratio``) and step 0's prediction for "fc" (and in evaluation with
    ``eval_first_exit="encoder"``, as the official RegNet evaluation); ``feature_dim`` / ``state_shape`` are read
    from one probe of the local encoder when not given. ``backend`` is the
    crop's (see :func:`dynkernels.ops.crop_patches`)."""

    def __init__(
        self,
        global_encoder: nn.Module,
        local_encoder: nn.Module,
        *,
        num_classes: int,
        patch_size: int = 96,
        steps: int = 5,
        classifier: str = "gru",
        policy: str = "mlp",
        global_head: nn.Module | None = None,
        local_head: nn.Module | None = None,
        eval_first_exit: str = "classifier",
        feature_dim: int | None = None,
        state_shape: Sequence[int] | None = None,
        in_channels: int = 3,
        classifier_hidden: int = 1024,
        policy_hidden: int = 1024,
        action_std: float = 0.1,
        glance_mode: str = "bicubic",
        eval_glance_mode: str | None = None,
        dsn_ratio: float = 1.0,
        train_global_encoder: bool = True,
        gamma: float = 0.7,
        clip: float = 0.2,
        ppo_epochs: int = 1,
        backend: str | None = None,
    ):
        super().__init__()
        if steps < 1 or (classifier == "fc" and steps < 2):
            raise ValueError(f"steps must be >= 1 (>= 2 for the 'fc' classifier), got {steps}")
        if eval_first_exit not in ("classifier", "encoder"):
            raise ValueError(f"eval_first_exit must be 'classifier' or 'encoder', got {eval_first_exit!r}")
        if (eval_first_exit == "encoder" or classifier == "fc") and global_head is None:
            raise ValueError("step 0 classifies with the global encoder's head here: pass global_head")
        for mode in (glance_mode, eval_glance_mode or glance_mode):
            if mode not in ("bicubic", "bilinear"):
                raise ValueError(f"glance modes must be 'bicubic' or 'bilinear', got {mode!r}")
        self.global_encoder, self.local_encoder = global_encoder, local_encoder
        self.global_head, self.local_head = global_head, local_head
        self.patch_size, self.steps, self.num_classes = int(patch_size), int(steps), int(num_classes)
        if feature_dim is None or state_shape is None:
            probe_feature, probe_map = self._probe(local_encoder, in_channels)
            feature_dim = feature_dim or probe_feature
            state_shape = state_shape or probe_map
        self.classifier = GFNetClassifier(feature_dim, num_classes, steps, classifier, classifier_hidden)
        self.policy = GFNetPolicy(state_shape, policy_hidden, policy, action_std)
        self.policy_old = copy.deepcopy(self.policy).requires_grad_(False)  # acts while PPO collects data
        self.eval_first_exit = eval_first_exit
        self.glance_mode, self.eval_glance_mode = glance_mode, eval_glance_mode or glance_mode
        self.dsn_ratio, self.train_global_encoder = float(dsn_ratio), bool(train_global_encoder)
        self.gamma, self.clip, self.ppo_epochs = float(gamma), float(clip), int(ppo_epochs)
        self.backend = backend
        self._ppo_optimizer = None

    @classmethod
    def from_timm(cls, name: str, *, num_classes: int, pretrained: bool = False, **kwargs) -> GFNet:
        """Two timm backbones ``name`` (global and local) wrapped to return
        (pre-logits feature, last feature map), their classifiers as the heads,
        and the official per-family defaults: T = 3 for MobileNetV3, 4 for
        EfficientNet, 5 otherwise; "fc" classifier and "conv" policy (hidden
        256) for MobileNetV3 / EfficientNet, "gru" + "conv" (256) for RegNet,
        "gru" + "mlp" (1024) for ResNet / DenseNet; a bilinear evaluation
        glance for DenseNet and RegNet. ``kwargs`` override any of them."""
        import timm

        def make():
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)

        small = any(k in name for k in ("mobilenetv3", "efficientnet"))
        defaults = {
            "steps": 3 if "mobilenetv3" in name else 4 if "efficientnet" in name else 5,
            "classifier": "fc" if small else "gru",
            "policy": "conv" if small or "regnet" in name else "mlp",
            "policy_hidden": 256 if small or "regnet" in name else 1024,
            "eval_glance_mode": "bilinear" if ("densenet" in name or "regnet" in name) else "bicubic",
        }
        defaults.update(kwargs)
        global_model, local_model = make(), make()
        return cls(
            TimmEncoder(global_model),
            TimmEncoder(local_model),
            num_classes=num_classes,
            global_head=global_model.get_classifier(),
            local_head=local_model.get_classifier(),
            **defaults,
        )

    def _probe(self, encoder, in_channels):
        was = encoder.training
        param = next(encoder.parameters(), None)
        x = torch.zeros(
            1, in_channels, self.patch_size, self.patch_size, device=None if param is None else param.device
        )
        try:
            encoder.eval()
            with torch.no_grad():
                feature, fmap = encoder(x)
        finally:
            encoder.train(was)
        return int(feature.shape[1]), tuple(int(v) for v in fmap.shape[1:])

    # ---- pieces ----------------------------------------------------------------------------------------------------
    def _glance(self, images, mode):
        feature, fmap = self.global_encoder(ops.glance(images, self.patch_size, mode=mode))
        return feature, fmap.detach()

    def _first(self, feature, evaluation):
        # training: the GRU classifier's step 0 ("gru"), the global head ("fc"); evaluation: eval_first_exit
        logits, state = self.classifier.step(feature, 0, None)
        if logits is None or (evaluation and self.eval_first_exit == "encoder"):
            logits = self.global_head(feature)
        return logits, state

    def _focus(self, images, actions, index=None):
        patches = ops.crop_patches(images, actions, self.patch_size, index=index, backend=self.backend)
        feature, fmap = self.local_encoder(patches)
        return feature, fmap.detach()

    def _act(self, policy, fmap, hidden, sample):
        mean, _, hidden = policy.step(fmap, hidden)
        if not sample:
            return mean, hidden, None
        action = mean + policy.action_std * torch.randn_like(mean)
        action = 1 - F.relu(1 - F.relu(action))  # the official clamp, to the ulp (1 - (1 - a) may differ from a)
        return action, hidden, policy.log_prob(mean, action)

    def rollout(
        self,
        images: torch.Tensor,
        *,
        actions: str = "policy",
        sample: bool = False,
        mode: str | None = None,
        evaluation: bool = False,
    ):
        """All T steps for every sample (the official training / evaluation
        loop). ``actions``: "random" (stage 1) or "policy" (the acting policy;
        ``sample=True`` draws from its Gaussian and clamps, as PPO collects
        data; else its mean). Returns a dict: ``logits`` [T x (B, K)],
        ``dsn`` [T x (B, K) or None] (the encoders' heads), ``states`` (T-1,
        B, C, h, w) (the feature maps the policy saw), ``actions`` (T-1, B, 2),
        ``logprobs`` (T-1, B) (sampled only). ``evaluation``: step 0 as
        ``eval_first_exit`` says (else as the official training)."""
        if actions not in ("random", "policy"):
            raise ValueError(f"actions must be 'random' or 'policy', got {actions!r}")
        mode = mode or (self.glance_mode if self.training else self.eval_glance_mode)
        policy = self.policy_old if sample else self.policy
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_global_encoder):
            feature, fmap = self._glance(images, mode)
            logits, cls_state = self._first(feature, evaluation)
            out = {"logits": [logits], "dsn": [self.global_head(feature) if self.global_head is not None else None]}
        states, taken, logprobs, hidden = [], [], [], None
        for k in range(1, self.steps):
            if actions == "random":
                action = torch.rand(images.shape[0], 2, device=images.device)  # float32, as the official
            else:
                with torch.no_grad():
                    action, hidden, logprob = self._act(policy, fmap, hidden, sample)
                if logprob is not None:
                    logprobs.append(logprob)
            states.append(fmap)
            taken.append(action)
            feature, fmap = self._focus(images, action)
            logits, cls_state = self.classifier.step(feature, k, cls_state)
            out["logits"].append(logits)
            out["dsn"].append(self.local_head(feature) if self.local_head is not None else None)
        out["states"] = torch.stack(states) if states else None
        out["actions"] = torch.stack(taken) if taken else None
        out["logprobs"] = torch.stack(logprobs) if logprobs else None
        return out

    # ---- training --------------------------------------------------------------------------------------------------
    def classification_loss(self, images: torch.Tensor, targets: torch.Tensor, *, stage: int = 1):
        """Stages 1 and 3: ``(sum_t CE(logits_t) + dsn_ratio sum_t CE(head_t))
        / T`` (heads that were not given are left out); stage 1 crops at
        random, stage 3 where the policy samples. Returns (loss, rollout)."""
        if stage not in (1, 3):
            raise ValueError(f"classification_loss is stages 1 and 3 (stage 2 is ppo_step), got {stage}")
        roll = self.rollout(images, actions="random" if stage == 1 else "policy", sample=stage == 3)
        loss = sum(F.cross_entropy(z, targets) for z in roll["logits"])
        dsn = [F.cross_entropy(z, targets) for z in roll["dsn"] if z is not None]
        if dsn:
            loss = loss + self.dsn_ratio * sum(dsn)
        return loss / self.steps, roll

    def sync_acting_policy(self) -> None:
        """Copy ``policy`` into ``policy_old`` (the copy that samples actions
        in stages 2 and 3), as the official code does after loading a
        checkpoint's policy and after every PPO update."""
        self.policy_old.load_state_dict(self.policy.state_dict())

    def ppo_optimizer(self, lr: float = 3e-4) -> torch.optim.Optimizer:
        """The official PPO optimizer, Adam(lr 3e-4, betas (0.9, 0.999)) on the policy, made once."""
        if self._ppo_optimizer is None:
            self._ppo_optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr, betas=(0.9, 0.999))
        return self._ppo_optimizer

    def ppo_step(self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer | None = None):
        """Stage 2: one PPO update of the policy from one batch (see the
        module docstring). The encoders and the classifier run in eval mode,
        without gradients. Returns {"loss", "rewards" (T-1, B)}."""
        if self.steps < 2:
            raise ValueError("ppo_step needs steps >= 2")
        frozen = [
            m
            for m in (self.global_encoder, self.local_encoder, self.classifier, self.global_head, self.local_head)
            if m is not None
        ]
        modes = [m.training for m in frozen]
        try:
            for m in frozen:
                m.eval()
            with torch.no_grad():
                roll = self.rollout(images, actions="policy", sample=True, mode=self.glance_mode)
        finally:
            for m, was in zip(frozen, modes, strict=True):
                m.train(was)
        with torch.no_grad():
            probs = torch.stack([F.softmax(z, 1).gather(1, targets[:, None])[:, 0] for z in roll["logits"]])
            rewards = probs[1:] - probs[:-1]
            returns = torch.empty_like(rewards)
            running = torch.zeros_like(rewards[0])
            for k in range(rewards.shape[0] - 1, -1, -1):
                running = rewards[k] + self.gamma * running
                returns[k] = running
            returns = (returns - returns.mean()) / (returns.std() + 1e-5)
        optimizer = optimizer or self.ppo_optimizer()
        for _ in range(self.ppo_epochs):
            logprobs, values, entropy = self.policy.evaluate(roll["states"], roll["actions"])
            ratios = torch.exp(logprobs - roll["logprobs"])
            advantages = returns - values.detach()
            surrogate = torch.min(ratios * advantages, ratios.clamp(1 - self.clip, 1 + self.clip) * advantages)
            loss = (-surrogate + 0.5 * F.mse_loss(values, returns) - 0.01 * entropy).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.sync_acting_policy()
        return {"loss": loss.detach(), "rewards": rewards}

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def simulate(self, images: torch.Tensor) -> torch.Tensor:
        """The official evaluation: every step for every sample; softmax
        probabilities (T, B, K) (the policy's mean actions)."""
        _require_eval(self, "simulate")
        return torch.stack([F.softmax(z, 1) for z in self.rollout(images, evaluation=True)["logits"]])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, thresholds: torch.Tensor) -> EarlyExitResult:
        """The real early exit (see the module docstring)."""
        _require_eval(self, "predict")
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")

        def step(k, rows, state):
            fmap, cls_state, hidden = state
            if k == 0:
                feature, fmap = self._glance(images, self.eval_glance_mode)
                logits, cls_state = self._first(feature, True)
                return logits, (fmap, cls_state, None)
            action, hidden, _ = self._act(self.policy, fmap, hidden, False)
            feature, fmap = self._focus(images, action, index=rows)
            logits, cls_state = self.classifier.step(feature, k, cls_state)
            return logits, (fmap, cls_state, hidden)

        dims = (0, self.classifier.state_dim, 1)
        return _run_early_exit(self.steps, step, (None, None, None), dims, images.shape[0], thresholds, images.device)

    def calibrate(self, batches: torch.Tensor | Iterable, *, q: float | None = None, proportions=None, sentinel="1e8"):
        """Budget thresholds (T,) from ``simulate`` on the calibration batches
        (a tensor, or an iterable of tensors or (images, targets) pairs)."""
        return _calibrate(self.simulate, batches, q, proportions, sentinel)


def _batch_dim_state(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class EarlyExitCascade(nn.Module):
    """See the module docstring. ``forward(x)`` returns every exit's logits
    (the full path, as MSDNet's ``calc_logit``)."""

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module]):
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(
                f"stages and heads must be non-empty and of one length, got {len(stages)} and {len(heads)}"
            )
        self.stages, self.heads = nn.ModuleList(stages), nn.ModuleList(heads)

    def forward(self, x):
        outs = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            outs.append(head(x))
        return outs

    @torch.no_grad()
    def simulate(self, x) -> torch.Tensor:
        _require_eval(self, "simulate")
        return torch.stack([F.softmax(z, 1) for z in self(x)])

    @torch.no_grad()
    def predict(self, x, thresholds: torch.Tensor) -> EarlyExitResult:
        _require_eval(self, "predict")
        parts = _batch_dim_state(x)
        single = [isinstance(x, torch.Tensor)]

        def step(k, rows, state):
            y = self.stages[k](state[0] if single[0] else list(state))
            single[0] = isinstance(y, torch.Tensor)
            return self.heads[k](y), _batch_dim_state(y)

        return _run_early_exit(len(self.stages), step, parts, None, parts[0].shape[0], thresholds, parts[0].device)

    def calibrate(self, batches, *, q: float | None = None, proportions=None, sentinel="1e8"):
        return _calibrate(self.simulate, batches, q, proportions, sentinel)
