"""Evolving Attention: the fused map step (evolve_attention_logits) and the
whole attention step (evolving_attention) against the reference (Conv2d, add,
softmax, matmul, as the official code), forward and forward+backward, at the
ViT-B/16, BERT-base and AA-ResNet sizes. Groups are "<op> <size>"; the peak
memory of one call is stored in extra_info."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("evolving_attention"))
def test_evolving_attention(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
