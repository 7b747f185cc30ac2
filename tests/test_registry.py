"""The op registry and the per-family Triton import (issue 11): every op is
declared once, the backend axes come from it, and one family's broken Triton
module disables that family's Triton backend only."""

from __future__ import annotations

import inspect

import pytest
import torch

import dynkernels
from dynkernels import _triton, ops
from dynkernels._backends import op_backend, resolve, usable_backends
from dynkernels._extension import BackendUnavailableError
from dynkernels._registry import BACKENDS, families, op_spec, register_op, registered_ops


def test_every_public_op_with_a_backend_is_registered_once():
    names = [spec.name for spec in registered_ops()]
    assert len(names) == len(set(names))
    for name in ops.__all__:
        fn = getattr(ops, name)
        if not inspect.isfunction(fn):  # e.g. ops.Segments, a result type
            continue
        if "backend" in inspect.signature(fn).parameters:
            target = {"local_attention_packed": "local_attention", "isda_update": "isda_update_"}.get(name, name)
            assert target in names, name
    for spec in registered_ops():
        assert callable(spec.reference) and "reference" in spec.backends
        assert set(spec.differentiable) <= set(spec.backends) <= set(BACKENDS)
    assert {"pointops", "pointformer", "evolving_attention", "isda", "segment"} <= set(families())


def test_registration_rejects_contradictions():
    with pytest.raises(ValueError, match="include 'reference'"):
        register_op("bogus_op", "bogus", ("cpp",), reference=lambda: None)
    with pytest.raises(ValueError, match="differentiable"):
        register_op("bogus_op", "bogus", ("reference",), reference=lambda: None, differentiable=("cpp",))
    with pytest.raises(ValueError, match="already declared by family 'pointops'"):
        register_op("knn", "bogus", ("reference",), reference=lambda: None)
    with pytest.raises(KeyError, match="no op 'nope'"):
        op_spec("nope")


def test_resolve_reads_the_registry():
    cpu = torch.device("cpu")
    assert resolve("knn", cpu, "reference") == "reference"
    with pytest.raises(ValueError, match="not implemented for this op; it has"):
        resolve("knn", cpu, "triton")
    assert op_backend("triton", "ball_query") is None  # a module set to triton runs ball query by auto
    assert op_backend("triton", "grouping_operation") == "triton"
    assert "reference" in usable_backends("knn", "cpu")
    if dynkernels.info()["extension"]["built"]:
        assert resolve("knn", cpu, None) == "cpp"


def test_a_broken_family_disables_only_its_own_triton_backend(monkeypatch):
    if "triton" not in usable_backends("grouping_operation", "cpu"):
        pytest.skip("triton is not usable here")
    monkeypatch.delitem(_triton._MODULES, "pointformer", raising=False)
    monkeypatch.setitem(_triton._ERRORS, "pointformer", "the pointformer Triton kernels could not be imported (test)")
    with pytest.raises(BackendUnavailableError, match="pointformer Triton kernels could not be imported"):
        resolve("local_attention", torch.device("cpu"), "triton")
    assert "triton" not in usable_backends("local_attention", "cpu")
    assert resolve("grouping_operation", torch.device("cpu"), "triton") == "triton"
    report = dynkernels.info()["ops"]
    assert "could not be imported" in report["local_attention"]["backends"]["cpu"]["triton"]
    assert report["grouping_operation"]["backends"]["cpu"]["triton"] is None


def test_family_error_names_a_missing_module():
    assert "no_such_family Triton kernels could not be imported" in _triton.family_error("no_such_family")
    with pytest.raises(BackendUnavailableError):
        _triton.family_kernels("no_such_family")
