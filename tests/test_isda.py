"""ISDA references: the plain per-class math against the official
formulation, and both against ground truth (the running estimator equals the
population moments of everything seen so far)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_clear_error, assert_close_to_float64, bad_input_params, kernel_cases, requires_cuda

from dynkernels.reference import isda


def _state(classes, dim, full, dtype=torch.float64):
    cov = torch.zeros(classes, dim, dim, dtype=dtype) if full else torch.zeros(classes, dim, dtype=dtype)
    return cov, torch.zeros(classes, dim, dtype=dtype), torch.zeros(classes, dtype=dtype)


def _batches(classes, dim, g):
    """Batches with absent classes, a class seen once, and one batch of a single class."""
    sizes_labels = [
        torch.tensor([0, 0, 1, 1, 1, 3]),  # class 2 and 4 absent
        torch.tensor([2]),  # class 2 seen once
        torch.tensor([4, 4, 4, 4, 4, 4, 4]),  # all one class
        torch.randint(0, classes, (23,), generator=g),
    ]
    return [(torch.randn(len(t), dim, generator=g, dtype=torch.float64) * 3 + 5, t) for t in sizes_labels]


@pytest.mark.parametrize("full", [True, False])
def test_estimator_is_the_population_moments_of_all_seen(full):
    g = torch.Generator().manual_seed(0)
    classes, dim = 5, 6
    mine, official = _state(classes, dim, full), _state(classes, dim, full)
    seen_x, seen_t = [], []
    for x, t in _batches(classes, dim, g):
        mine = isda.update_estimator(x, t, *mine)
        official = isda.update_estimator_official(x, t, *official)
        for a, b in zip(mine, official, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        seen_x.append(x)
        seen_t.append(t)
    x, t = torch.cat(seen_x), torch.cat(seen_t)
    cov, mean, amount = mine
    for c in range(classes):
        xc = x[t == c]
        assert amount[c] == len(xc)
        if len(xc) == 0:
            assert (mean[c] == 0).all() and (cov[c] == 0).all()
            continue
        centred = xc - xc.mean(0)
        want = centred.T @ centred / len(xc) if full else (centred * centred).mean(0)
        torch.testing.assert_close(mean[c], xc.mean(0))
        torch.testing.assert_close(cov[c], want)


@pytest.mark.parametrize("full", [True, False])
def test_augmented_logits_and_gradients_match_the_official_formulation(full):
    g = torch.Generator().manual_seed(1)
    n, classes, dim = 9, 7, 5
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 6, 1, 0, 3, 2, 6])
    a = torch.randn(classes, dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) if full else torch.rand(classes, dim, generator=g, dtype=torch.float64)
    lam = 0.7
    got = isda.isda_logits(logits, weight, labels, cov, lam)
    want = isda.isda_logits_official(logits, weight, labels, cov, lam)
    torch.testing.assert_close(got, want)
    # the true class is never shifted
    torch.testing.assert_close(got.gather(1, labels[:, None]), logits.gather(1, labels[:, None]))
    grads = torch.autograd.grad(isda.isda_loss(logits, weight, labels, cov, lam), (logits, weight))
    ref = torch.autograd.grad(isda.isda_loss_official(logits, weight, labels, cov, lam), (logits, weight))
    for x, y in zip(grads, ref, strict=True):
        torch.testing.assert_close(x, y)


def test_per_sample_variance_equals_the_per_class_form_when_gathered():
    g = torch.Generator().manual_seed(2)
    n, classes, dim = 6, 4, 3
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 3, 2, 1])
    var = torch.rand(classes, dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        isda.isda_logits_per_sample(logits, weight, labels, var[labels], 0.3),
        isda.isda_logits(logits, weight, labels, var, 0.3),
    )


def test_estimator_bad_inputs():
    cov, mean, amount = _state(3, 4, True)
    with pytest.raises(ValueError, match="labels must lie"):
        isda.update_estimator(torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 3]), cov, mean, amount)
    with pytest.raises(ValueError, match="channels"):
        isda.update_estimator(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]), cov, mean, amount)
    # an empty batch changes nothing
    out = isda.update_estimator(
        torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long), cov, mean, amount
    )
    for a, b in zip(out, (cov, mean, amount), strict=True):
        assert torch.equal(a, b)


# ---- the per-class PyTorch ops (dynkernels.ops.isda_*) ---------------------

from dynkernels import ops  # noqa: E402


@pytest.mark.parametrize("full", [True, False])
def test_update_op_matches_the_official_formulation(full):
    g = torch.Generator().manual_seed(3)
    classes, dim = 5, 6
    mine, official = _state(classes, dim, full), _state(classes, dim, full)
    for x, t in _batches(classes, dim, g):
        mine = ops.isda_update(x, t, *mine)
        official = isda.update_estimator_official(x, t, *official)
        for a, b in zip(mine, official, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_loss_op_matches_the_official_formulation(full, symmetric):
    g = torch.Generator().manual_seed(4)
    n, classes, dim = 11, 6, 4
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 5, 2, 2, 2, 1, 0, 5, 3, 3])
    a = torch.randn(classes, dim, dim, generator=g, dtype=torch.float64)
    cov = (
        (a @ a.transpose(1, 2) if symmetric else a)
        if full
        else torch.rand(classes, dim, generator=g, dtype=torch.float64)
    )
    got = ops.isda_cross_entropy(logits, weight, labels, cov, 0.9)
    want = isda.isda_loss_official(logits, weight, labels, cov, 0.9)
    torch.testing.assert_close(got, want)
    for x, y in zip(
        torch.autograd.grad(got, (logits, weight)), torch.autograd.grad(want, (logits, weight)), strict=True
    ):
        torch.testing.assert_close(x, y)
    assert torch.autograd.gradcheck(lambda z, w: ops.isda_cross_entropy(z, w, labels, cov, 0.9), (logits, weight))
    if full and symmetric:  # the shortcut for an exactly symmetric Sigma gives the same gradients
        fast = ops.isda_cross_entropy(logits, weight, labels, cov, 0.9, assume_symmetric=True)
        for x, y in zip(
            torch.autograd.grad(fast, (logits, weight)),
            torch.autograd.grad(isda.isda_loss_official(logits, weight, labels, cov, 0.9), (logits, weight)),
            strict=True,
        ):
            torch.testing.assert_close(x, y)


def test_loss_op_bad_inputs():
    z, w = torch.randn(3, 4), torch.randn(4, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        ops.isda_cross_entropy(z, w, torch.tensor([0, 1, 4]), torch.rand(4, 2), 0.5)
    with pytest.raises(ValueError, match="must agree"):
        ops.isda_cross_entropy(z, torch.randn(5, 2), torch.tensor([0, 1, 2]), torch.rand(4, 2), 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        ops.isda_cross_entropy(z[:0], w, torch.zeros(0, dtype=torch.long), torch.rand(4, 2), 0.5)


# ---- the criterion (dynkernels.nn.ISDALoss) ---------------------------------

from dynkernels import nn as dnn  # noqa: E402


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_criterion_trains_like_the_official_pipeline(covariance):
    torch.manual_seed(5)
    classes, dim = 4, 6
    fc = torch.nn.Linear(dim, classes).double()
    crit = dnn.ISDALoss(dim, classes, 0.5, covariance=covariance).double()
    state = _state(classes, dim, covariance == "full")
    for step in range(3):
        x = torch.randn(10, dim, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, classes, (10,))
        loss = crit(x, fc, t, progress=step / 3)
        grads = torch.autograd.grad(loss, (x, fc.weight, fc.bias))
        state = isda.update_estimator_official(x.detach(), t, *state)
        want = isda.isda_loss_official(fc(x), fc.weight, t, state[0], 0.5 * step / 3)
        torch.testing.assert_close(loss, want)
        for a, b in zip(grads, torch.autograd.grad(want, (x, fc.weight, fc.bias)), strict=True):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(crit.covariance, state[0])
    restored = dnn.ISDALoss(dim, classes, 0.5, covariance=covariance).double()
    restored.load_state_dict(crit.state_dict())
    assert torch.equal(restored.amount, crit.amount)


def test_criterion_segmentation_ignores_pixels_in_the_loss_not_the_estimator():
    torch.manual_seed(6)
    classes, dim = 3, 4
    conv = torch.nn.Conv2d(dim, classes, 1).double()
    crit = dnn.ISDALoss(dim, classes, 1.0, covariance="diagonal", ignore_index=255).double()
    feats = torch.randn(2, dim, 5, 5, dtype=torch.float64)
    targets = torch.randint(0, classes, (2, 5, 5))
    targets[0, :2] = 255
    loss = crit(feats, conv, targets, progress=1.0)
    pixels = feats.permute(0, 2, 3, 1).reshape(-1, dim)
    flat = targets.reshape(-1)
    est = torch.where(flat == 255, torch.full_like(flat, classes), flat)
    state = isda.update_estimator_official(pixels, est, *_state(classes + 1, dim, False))
    keep = flat != 255
    logits = pixels @ conv.weight.view(classes, dim).T + conv.bias
    want = isda.isda_loss_official(logits[keep], conv.weight.view(classes, dim), flat[keep], state[0][:classes], 1.0)
    torch.testing.assert_close(loss, want)
    assert crit.amount[classes] == (flat == 255).sum()


# ---- distributed synchronisation (2 processes, gloo, CPU) --------------------


def _synced_rank(rank, world, port, covariance, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        classes, dim = 4, 5
        fc = torch.nn.Linear(dim, classes).double()
        crit = dnn.ISDALoss(dim, classes, 0.5, covariance=covariance, sync=True).double()
        g = torch.Generator().manual_seed(10)
        for step in range(3):
            # every rank draws all shards (same generator) and keeps its own; shard sizes differ
            shards = [torch.randn(5 + r + step, dim, generator=g, dtype=torch.float64) for r in range(world)]
            labels = [torch.randint(0, classes, (len(s),), generator=g) for s in shards]
            crit(shards[rank], fc, labels[rank], progress=0.5).backward()
        torch.save({k: v for k, v in crit.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_synced_estimators_equal_one_estimator_on_the_global_batch(covariance, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    mp.spawn(_synced_rank, args=(world, port, covariance, str(tmp_path)), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    classes, dim = 4, 5
    alone = _state(classes, dim, covariance == "full")
    g = torch.Generator().manual_seed(10)
    for step in range(3):
        shards = [torch.randn(5 + r + step, dim, generator=g, dtype=torch.float64) for r in range(world)]
        labels = [torch.randint(0, classes, (len(s),), generator=g) for s in shards]
        alone = isda.update_estimator(torch.cat(shards), torch.cat(labels), *alone)
    for state in states:
        for name, want in zip(("covariance", "mean", "amount"), alone, strict=True):
            torch.testing.assert_close(state[name], want, rtol=1e-12, atol=1e-12)


def test_cpp_full_update_keeps_the_covariance_exactly_symmetric_and_passes_opcheck():
    from dynkernels._extension import has_extension

    if not has_extension():
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(7)
    classes, dim = 4, 70  # 70: tiles of 32 that do not divide A
    state = _state(classes, dim, True, torch.float32)
    official = _state(classes, dim, True, torch.float32)
    for labels in ([0, 0, 1, 1, 1, 3], [2], [1] * 7, torch.randint(0, classes, (23,), generator=g).tolist()):
        t = torch.tensor(labels)
        x = torch.randn(len(t), dim, generator=g) * 3 + 5
        ops.isda_update_(x, t, *state)
        official = isda.update_estimator_official(x, t, *official)
        assert torch.equal(state[0], state[0].transpose(1, 2))
    for a, b in zip(state, official, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    x = torch.randn(6, dim, generator=g)
    args = (state[0].clone(), state[1].clone(), state[2].clone(), x, torch.tensor([0, 1, 1, 3, 3, 3]))
    torch.library.opcheck(torch.ops.dynkernels.isda_update_full_.default, args)


@pytest.mark.parametrize("full", [True, False])
def test_triton_update_matches_the_official_formulation(full):
    if not any(c.values[1] == "triton" for c in kernel_cases("isda_update_")):
        pytest.skip("triton is not usable here")
    g = torch.Generator().manual_seed(8)
    classes, dim = 4, 40  # 40: tiles of 32 that do not divide A
    for dtype in (torch.float64, torch.float32):
        state = _state(classes, dim, full, dtype)
        official = _state(classes, dim, full, dtype)
        for labels in ([0, 0, 1, 1, 1, 3], [2], [1] * 20):
            t = torch.tensor(labels)
            x = (torch.randn(len(t), dim, generator=g, dtype=torch.float64) * 3 + 5).to(dtype)
            assert ops.isda_update_(x, t, *state, backend="triton")
            official = isda.update_estimator_official(x, t, *official)
            if full:
                assert torch.equal(state[0], state[0].transpose(1, 2))
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        for a, b in zip(state, official, strict=True):
            torch.testing.assert_close(a, b, **tol)


def test_criterion_bad_inputs_and_symmetry_after_load():
    fc = torch.nn.Linear(6, 4)
    crit = dnn.ISDALoss(6, 4, 0.5)
    with pytest.raises(ValueError, match="features must be"):
        crit(torch.randn(3, 5), fc, torch.tensor([0, 1, 2]), progress=0.5)
    with pytest.raises(ValueError, match="weight must be"):
        crit(torch.randn(3, 6), torch.nn.Linear(6, 5), torch.tensor([0, 1, 2]), progress=0.5)
    with pytest.raises(ValueError, match="labels must lie"):
        crit(torch.randn(3, 6), fc, torch.tensor([0, 1, 7]), progress=0.5)
    with pytest.raises(ValueError, match="covariance must be"):
        dnn.ISDALoss(6, 4, 0.5, covariance="low-rank")
    state = crit.state_dict()
    state["covariance"][1, 0, 2] += 1.0  # no longer symmetric
    crit.load_state_dict(state)
    assert crit._symmetric is False


def test_loss_op_under_torch_compile():
    # Compiled, the per-label table has a fixed-size axis (every class here,
    # C <= N) instead of the distinct labels: one graph, the same values and gradients.
    g = torch.Generator().manual_seed(9)
    z = torch.randn(8, 5, generator=g, requires_grad=True)
    w = torch.randn(5, 4, generator=g, requires_grad=True)
    t = torch.tensor([0, 1, 1, 2, 3, 4, 0, 2])
    a = torch.rand(5, 4, 4, generator=g)
    cov = a @ a.transpose(1, 2)
    fn = lambda z, w: ops.isda_cross_entropy(z, w, t, cov, 0.5)  # noqa: E731
    eager, compiled = fn(z, w), torch.compile(fn, backend="aot_eager", fullgraph=True)(z, w)
    torch.testing.assert_close(compiled, eager)
    for x, y in zip(torch.autograd.grad(compiled, (z, w)), torch.autograd.grad(eager, (z, w)), strict=True):
        torch.testing.assert_close(x, y)


def test_diagonal_loss_stays_accurate_when_the_rows_of_w_share_an_offset():
    # The diagonal table expands (W_c - W_k)^2; centring W's rows first keeps
    # a shared offset out of the cancellation.
    g = torch.Generator().manual_seed(11)
    n, classes, dim = 32, 200, 512
    w = (torch.randn(classes, dim, generator=g) * 0.02 + 0.5).requires_grad_()
    z = torch.randn(n, classes, generator=g).requires_grad_()
    t = torch.randint(0, classes, (n,), generator=g)
    var = torch.rand(classes, dim, generator=g)
    got = ops.isda_cross_entropy(z, w, t, var, 7.5)
    z64, w64 = z.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = isda.isda_loss(z64, w64, t, var.double(), 7.5)
    torch32 = isda.isda_loss_official(z, w, t, var, 7.5)  # float32 official: the error to match
    assert_close_to_float64(got, torch32, truth)
    for ours, exact in zip(torch.autograd.grad(got, (z, w)), torch.autograd.grad(truth, (z64, w64)), strict=True):
        torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("full", [True, False])
def test_consistency_bound_lies_above_a_monte_carlo_estimate_of_the_kl(full):
    # The bound's derivation (Jensen and the Gaussian MGF), checked by sampling.
    g = torch.Generator().manual_seed(12)
    n, classes, dim, lam = 3, 4, 5, 0.8
    feats = torch.randn(n, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(classes, generator=g, dtype=torch.float64)
    a = torch.randn(classes, dim, dim, generator=g, dtype=torch.float64) * 0.5
    cov = a @ a.transpose(1, 2) if full else torch.rand(classes, dim, generator=g, dtype=torch.float64)
    logits = feats @ weight.T + bias
    bound = isda.isda_consistency_loss(logits, weight, cov, lam)
    p = torch.softmax(logits, 1)
    k = logits.argmax(1)
    samples = 20000
    kl = 0.0
    for i in range(n):
        sigma = lam * (cov[k[i]] if full else torch.diag(cov[k[i]]))
        dist = torch.distributions.MultivariateNormal(feats[i], covariance_matrix=sigma)
        aug = dist.sample((samples,)) @ weight.T + bias
        kl += (p[i] * (torch.log(p[i]) - torch.log_softmax(aug, 1))).sum(1).mean()
    kl = kl / n
    assert kl <= bound + 1e-3
    assert bound >= 0


@pytest.mark.parametrize("full", [True, False])
def test_consistency_op_matches_its_reference(full):
    g = torch.Generator().manual_seed(13)
    n, classes, dim = 9, 5, 4
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(classes, dim, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    a = torch.randn(classes, dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) if full else torch.rand(classes, dim, generator=g, dtype=torch.float64)
    for detach in (True, False):
        got = ops.isda_consistency_loss(logits, weight, cov, 0.6, detach_target=detach)
        want = isda.isda_consistency_loss(logits, weight, cov, 0.6, detach_target=detach)
        torch.testing.assert_close(got, want)
        for x, y in zip(
            torch.autograd.grad(got, (logits, weight)), torch.autograd.grad(want, (logits, weight)), strict=True
        ):
            torch.testing.assert_close(x, y)
    zero = ops.isda_consistency_loss(logits, weight, cov, 0.0)
    torch.testing.assert_close(zero, torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)


def test_consistency_module_uses_the_shared_estimator():
    torch.manual_seed(14)
    fc = torch.nn.Linear(6, 4).double()
    supervised = dnn.ISDALoss(6, 4, 0.5).double()
    supervised(torch.randn(20, 6, dtype=torch.float64), fc, torch.randint(0, 4, (20,)), progress=1.0)
    consistency = dnn.ISDAConsistencyLoss(supervised, 0.5)
    unlabeled = torch.randn(7, 6, dtype=torch.float64)
    got = consistency(unlabeled, fc, progress=0.5)
    want = isda.isda_consistency_loss(fc(unlabeled), fc.weight, supervised.covariance, 0.25)
    torch.testing.assert_close(got, want)
    amount = supervised.amount.clone()
    consistency(unlabeled, fc, progress=0.5)
    assert torch.equal(supervised.amount, amount)  # not updated by unlabeled data


def test_per_sample_variance_loss_matches_its_reference_with_gradients():
    g = torch.Generator().manual_seed(15)
    n, classes, dim = 7, 5, 6
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(classes, dim, generator=g, dtype=torch.float64) + 0.4).requires_grad_()
    variance = torch.rand(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 4, 2, 1, 0, 3])
    got = ops.isda_cross_entropy_per_sample(logits, weight, labels, variance, 0.7)
    want = torch.nn.functional.cross_entropy(isda.isda_logits_per_sample(logits, weight, labels, variance, 0.7), labels)
    torch.testing.assert_close(got, want)
    leaves = (logits, weight, variance)
    for x, y in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(x, y)
    assert torch.autograd.gradcheck(lambda z, w, v: ops.isda_cross_entropy_per_sample(z, w, labels, v, 0.7), leaves)
    with pytest.raises(ValueError, match=r"variance \(N, A\) and weight \(C, A\) must agree on A"):
        ops.isda_cross_entropy_per_sample(logits, weight, labels, variance[:, :3], 0.7)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_full_update_matches_the_official_formulation(backend):
    g = torch.Generator().manual_seed(16)
    classes, dim = 6, 100
    state = [t.cuda() for t in _state(classes, dim, True)]
    official = _state(classes, dim, True)
    for labels in ([0, 0, 1, 1, 1, 3], [2], [5] * 40, torch.randint(0, classes, (64,), generator=g).tolist()):
        t = torch.tensor(labels)
        x = torch.randn(len(t), dim, generator=g, dtype=torch.float64) * 3 + 5
        assert ops.isda_update_(x.cuda(), t.cuda(), *state, backend=backend)
        official = isda.update_estimator_official(x, t, *official)
        assert torch.equal(state[0], state[0].transpose(1, 2))
    for a, b in zip(state, official, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


def test_cpp_diagonal_update_opcheck_and_row_order_determinism():
    from dynkernels._extension import has_extension

    if not has_extension():
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(17)
    classes, dim = 5, 130  # 130: more than one column block
    x = torch.randn(40, dim, generator=g)
    t = torch.randint(0, classes, (40,), generator=g)
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            state = _state(classes, dim, False, torch.float32)
            ops.isda_update_(x, t, *state, backend="cpp")
            runs.append(state)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    args = (*(s.clone() for s in runs[0]), x, t)
    torch.library.opcheck(torch.ops.dynkernels.isda_update_diagonal_.default, args)


# ---- the pattern: backends from the registry, label checks, in-place safety ----


@pytest.mark.parametrize("full", [True, False])
def test_every_update_backend_matches_the_official_formulation_with_absent_classes(full):
    """Every backend of the registry's list (reference included), classes
    absent from some batches (their rows must not change, bit for bit)."""
    g = torch.Generator().manual_seed(21)
    classes, dim = 7, 9
    for device, backend in [("cpu", "reference")] + [c.values for c in kernel_cases("isda_update_")]:
        state = [t.to(device) for t in _state(classes, dim, full)]
        official = _state(classes, dim, full)
        for labels in ([0, 0, 3], [3, 3, 3, 3, 1], [6]):
            before = [t.clone() for t in state]
            t = torch.tensor(labels)
            x = torch.randn(len(t), dim, generator=g, dtype=torch.float64) * 2 + 1
            ops.isda_update_(x.to(device), t.to(device), *state, backend=backend)
            official = isda.update_estimator_official(x, t, *official)
            absent = [c for c in range(classes) if c not in labels]
            for now, was in zip(state, before, strict=True):
                assert torch.equal(now[absent], was[absent]), backend
        for a, b in zip(state, official, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


def test_update_label_checks_and_in_place_safety():
    cov, mean, amount = _state(3, 4, True)
    x = torch.randn(2, 4, dtype=torch.float64)
    for check in (True, "sync"):
        with pytest.raises(ValueError, match="labels must lie"):
            ops.isda_update_(x, torch.tensor([0, 3]), cov, mean, amount, check_labels=check)
    with pytest.raises(ValueError, match="check_labels"):
        ops.isda_update_(x, torch.tensor([0, 1]), cov, mean, amount, check_labels="yes")
    for bad in (torch.tensor([0.5, 1.0]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="int32 or int64"):
            ops.isda_update_(x, bad, cov, mean, amount)
    with pytest.raises(ValueError, match="overlap"):  # one block shared by every class
        ops.isda_update_(x, torch.tensor([0, 1]), cov[:1].expand(3, 4, 4), mean, amount)
    # check_labels=False on the Triton path: a label outside [0, C) is dropped
    if any(c.values[1] == "triton" for c in kernel_cases("isda_update_")):
        mine, want = _state(3, 4, True), _state(3, 4, True)
        ops.isda_update_(x, torch.tensor([1, 7]), *mine, check_labels=False, backend="triton")
        want = isda.update_estimator_official(x[:1], torch.tensor([1]), *want)
        for a, b in zip(mine, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("full", [True, False])
def test_update_writes_through_non_contiguous_estimators(full):
    g = torch.Generator().manual_seed(22)
    classes, dim = 4, 5
    x = torch.randn(9, dim, generator=g, dtype=torch.float64)
    t = torch.randint(0, classes, (9,), generator=g)
    want = isda.update_estimator(x, t, *_state(classes, dim, full))
    for device, backend in [c.values for c in kernel_cases("isda_update_")]:
        cov, mean, amount = (s.to(device) for s in _state(classes, dim, full))
        cov_t = cov.transpose(-1, -2).contiguous().transpose(-1, -2) if full else cov.T.contiguous().T
        wide = torch.zeros(classes, 2 * dim, dtype=torch.float64, device=device)
        wide[:, ::2] = mean
        mean_s = wide[:, ::2]  # a strided view
        ops.isda_update_(x.to(device), t.to(device), cov_t, mean_s, amount, backend=backend)
        for a, b in zip((cov_t, mean_s, amount), want, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        assert torch.equal(wide[:, 1::2], torch.zeros_like(wide[:, 1::2]))  # the gaps untouched


@pytest.mark.parametrize("full", [True, False])
def test_every_loss_backend_agrees_with_gradients(full):
    """The losses' backends (composite, reference) from the registry, with
    ignored labels: equal values and gradients."""
    g = torch.Generator().manual_seed(23)
    n, classes, dim = 10, 5, 3
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 4, 255, 2, 2, 255, 1, 0, 4])
    a = torch.randn(classes, dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) if full else torch.rand(classes, dim, generator=g, dtype=torch.float64)
    results = {}
    for backend in ("reference",) + tuple(c.values[1] for c in kernel_cases("isda_cross_entropy")):
        loss = ops.isda_cross_entropy(logits, weight, labels, cov, 0.8, ignore_index=255, backend=backend)
        results[backend] = (loss, *torch.autograd.grad(loss, (logits, weight)))
    assert "composite" in results
    for got, want in zip(results["composite"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    keep = labels != 255
    official = isda.isda_loss_official(logits[keep], weight, labels[keep], cov, 0.8)
    torch.testing.assert_close(results["composite"][0], official, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z, w: ops.isda_cross_entropy(z, w, labels, cov, 0.8, ignore_index=255), (logits, weight)
    )
    variance = cov[labels.clamp(max=classes - 1)] if not full else torch.rand(n, dim, generator=g, dtype=torch.float64)
    for backend in ("reference", "composite"):
        c1 = ops.isda_consistency_loss(logits, weight, cov, 0.8, backend=backend)
        p1 = ops.isda_cross_entropy_per_sample(logits, weight, labels.clamp(max=4), variance, 0.8, backend=backend)
        results[f"aux-{backend}"] = (c1, p1)
    for got, want in zip(results["aux-composite"], results["aux-reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@requires_cuda
def test_gpu_paths_do_not_sync_with_the_host():
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call."""
    g = torch.Generator().manual_seed(24)
    x = torch.randn(64, 40, generator=g).cuda()
    t = torch.randint(0, 6, (64,), generator=g).cuda()
    src = torch.randn(64, 33, generator=g).cuda()
    for backend in [c.values[1] for c in kernel_cases("isda_update_") if c.values[0] == "cuda"]:
        for full in (True, False):
            state = [s.float().cuda() for s in _state(6, 40, full)]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                ops.isda_update_(x, t, *state, backend=backend)
                ops.scatter_add(src, t, 6, backend=backend, deterministic=True)
                ops.scatter_reduce(src, t, 6, "max", backend=backend)
            finally:
                torch.cuda.set_sync_debug_mode("default")


# ---- issue 12: every bad input a clear error naming the argument ------------


def _bad_isda_cases():
    g = torch.Generator().manual_seed(30)
    x, t = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 1, 2])
    state = lambda full=True: _state(3, 3, full, torch.float32)  # noqa: E731
    z, w = torch.randn(4, 3, generator=g), torch.randn(3, 3, generator=g)
    cov = torch.rand(3, 3, generator=g)
    crit = dnn.ISDALoss(3, 3, 0.5)
    fc = torch.nn.Linear(3, 3)
    return [
        ("float labels", lambda: ops.isda_update_(x, t.float(), *state()), ValueError, "labels must be int32 or int64"),
        ("bool labels", lambda: ops.isda_update_(x, t > 0, *state()), ValueError, "labels must be int32 or int64"),
        ("complex features", lambda: ops.isda_update_(x.to(torch.complex64), t, *state()), TypeError, "features"),
        ("negative amount", lambda: ops.isda_update_(x, t, *state()[:2], -torch.ones(3)), ValueError, "amount"),
        (
            "expanded cov",
            lambda: ops.isda_update_(x, t, state()[0][:1].expand(3, 3, 3), *state()[1:]),
            ValueError,
            "overlap",
        ),
        (
            "numpy features",
            lambda: ops.isda_update_(x.numpy(), t, *state()),
            TypeError,
            "features must be a torch.Tensor",
        ),
        (
            "int64 mean",
            lambda: ops.isda_update_(x, t, state()[0], torch.zeros(3, 3, dtype=torch.long), state()[2]),
            TypeError,
            "mean",
        ),
        ("labels on meta", lambda: ops.isda_update_(x, t.to("meta"), *state()), ValueError, "one device"),
        ("int64 logits", lambda: ops.isda_cross_entropy(z.long(), w, t, cov, 0.5), TypeError, "logits"),
        ("lam None", lambda: ops.isda_cross_entropy(z, w, t, cov, None), TypeError, "lam must be a real number"),
        ("lam str", lambda: ops.isda_cross_entropy(z, w, t, cov, "0.5"), TypeError, "lam must be a real number"),
        ("lam nan", lambda: ops.isda_cross_entropy(z, w, t, cov, float("nan")), ValueError, "lam must be finite"),
        ("empty batch", lambda: ops.isda_cross_entropy(z[:0], w, t[:0], cov, 0.5), ValueError, "non-empty batch"),
        (
            "empty per-sample",
            lambda: ops.isda_cross_entropy_per_sample(z[:0], w, t[:0], x[:0], 0.5),
            ValueError,
            "non-empty batch",
        ),
        ("empty consistency", lambda: ops.isda_consistency_loss(z[:0], w, cov, 0.5), ValueError, "non-empty batch"),
        ("consistency cov (C,)", lambda: ops.isda_consistency_loss(z, w, cov[:, 0], 0.5), ValueError, "cov must be"),
        ("consistency cov wrong C", lambda: ops.isda_consistency_loss(z, w, cov[:2], 0.5), ValueError, "cov must be"),
        (
            "per-sample wrong A in weight",
            lambda: ops.isda_cross_entropy_per_sample(z, w[:, :2], t, x, 0.5),
            ValueError,
            "must agree on A",
        ),
        ("loss labels float", lambda: ops.isda_cross_entropy(z, w, t.float(), cov, 0.5), ValueError, "labels must be"),
        ("criterion float targets", lambda: crit(x, fc, t.float(), 0.5), ValueError, "targets must be int32 or int64"),
        ("criterion progress None", lambda: crit(x, fc, t, None), TypeError, "progress must be a real number"),
        ("criterion progress nan", lambda: crit(x, fc, t, float("nan")), ValueError, "progress must be finite"),
        ("criterion numpy features", lambda: crit(x.numpy(), fc, t, 0.5), TypeError, "features must be a torch.Tensor"),
        (
            "consistency mismatched fc",
            lambda: dnn.ISDAConsistencyLoss(crit, 0.5)(x, torch.nn.Linear(3, 5), 0.5),
            ValueError,
            "final layer's weight",
        ),
        (
            "consistency empty",
            lambda: dnn.ISDAConsistencyLoss(crit, 0.5)(x[:0], fc, 0.5),
            ValueError,
            "non-empty batch",
        ),
    ]


@pytest.mark.parametrize("call,error,match", bad_input_params(_bad_isda_cases()))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


def test_module_errors_come_at_construction():
    for kwargs, error, match in (
        (dict(num_features=0, num_classes=3, lambda0=0.5), ValueError, "num_features"),
        (dict(num_features=3, num_classes=3.0, lambda0=0.5), TypeError, "num_classes"),
        (dict(num_features=3, num_classes=3, lambda0="0.5"), TypeError, "lambda0"),
        (dict(num_features=3, num_classes=3, lambda0=0.5, covariance="low-rank"), ValueError, "covariance"),
        (dict(num_features=3, num_classes=3, lambda0=0.5, ignore_index="void"), TypeError, "ignore_index"),
        (dict(num_features=3, num_classes=3, lambda0=0.5, backend="gpu"), ValueError, "backend must be"),
    ):
        with pytest.raises(error, match=match):
            dnn.ISDALoss(**kwargs)
    with pytest.raises(TypeError, match="estimator must be"):
        dnn.ISDAConsistencyLoss(torch.nn.Linear(3, 3), 0.5)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_an_all_ignored_segmentation_batch_gives_a_zero_loss_in_the_graph(covariance):
    crit = dnn.ISDALoss(4, 3, 0.5, covariance=covariance, ignore_index=255)
    fc = torch.nn.Linear(4, 3)
    warm = torch.randn(2, 4, 3, 3)
    crit(warm, fc, torch.randint(0, 3, (2, 3, 3)), 0.5)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = crit(x, fc, torch.full((2, 3, 3), 255), 0.5)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(fc.weight.grad, torch.zeros_like(fc.weight))
    for name, value in crit.state_dict().items():  # no class row changed; row C (the ignored pixels) did
        assert torch.equal(value[:3], before[name][:3]), name


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
@pytest.mark.parametrize("n", [16, 3])  # C <= N: a class axis; C > N: a sample axis
def test_one_training_step_compiles_as_one_graph(covariance, n):
    """torch.compile(fullgraph=True) of the estimator update, the loss and the
    consistency term, forward and backward, equal to eager."""
    torch.manual_seed(31)
    fc = torch.nn.Linear(6, 5).double()
    crits = [dnn.ISDALoss(6, 5, 0.5, covariance=covariance, ignore_index=255).double() for _ in range(2)]
    cons = [dnn.ISDAConsistencyLoss(c, 0.3) for c in crits]
    x = torch.randn(n, 6, dtype=torch.float64)
    t = torch.randint(0, 5, (n,))
    t[0] = 255
    u = torch.randn(4, 6, dtype=torch.float64)
    warm = torch.randn(12, 6, dtype=torch.float64)

    def step(crit, con, x, t, u):
        return crit(x, fc, t, 0.7) + con(u, fc, 0.7)

    results = []
    for i, fn in enumerate((step, torch.compile(step, fullgraph=True, backend="aot_eager"))):
        crits[i](warm, fc, torch.arange(12) % 5, 0.7)  # a warm estimator
        xi = x.clone().requires_grad_()
        fc.zero_grad()
        loss = fn(crits[i], cons[i], xi, t, u)
        loss.backward()
        results.append((loss.detach(), xi.grad, fc.weight.grad.clone(), *crits[i].state_dict().values()))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
