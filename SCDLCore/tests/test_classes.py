"""class_argmax: torch's argmax along the class axis, first maximum winning ties."""

from __future__ import annotations

import pytest
import torch

from scdlcore.classes import class_argmax


@pytest.mark.parametrize("dim", [0, 1])
def test_class_argmax_is_torch_argmax(dim):
    scores = torch.randn(2, 5, 4, 3, 6) if dim == 1 else torch.randn(5, 4, 3, 6)
    assert torch.equal(class_argmax(scores, dim), scores.argmax(dim))


def test_ties_go_to_the_first_class_and_the_input_is_left_alone():
    scores = torch.tensor([[1.0, 2.0], [1.0, 3.0], [0.5, 3.0]])  # (C=3, N=2)
    before = scores.clone()
    assert class_argmax(scores).tolist() == [0, 1]
    assert torch.equal(scores, before)
