from __future__ import annotations

import pytest
import torch

from hpsearch.model import CNN, ModelSpec, count_parameters, flops_per_sample


@pytest.mark.parametrize("channels,hw", [(1, (24, 24)), (3, (28, 28))])
def test_cnn_outputs_logits_for_any_input_shape(channels, hw) -> None:
    spec = ModelSpec(channels, 10, hw, 8, 16, 0.2)
    model = CNN(spec).eval()
    out = model(torch.randn(4, channels, *hw))
    assert out.shape == (4, 10)
    # Logits, not probabilities: the seed's Softmax-before-CrossEntropy mistake is not here.
    assert not torch.allclose(out.exp().sum(1), torch.ones(4))
    assert not any(isinstance(m, torch.nn.Softmax) for m in model.modules())


def test_seed_shapes_and_counts() -> None:
    spec = ModelSpec(1, 10, (24, 24), 32, 64, 0.0)
    assert spec.feature_hw() == (3, 3)  # the seed's 576 = 64 * 3 * 3 features
    assert count_parameters(CNN(spec)) == (1 * 25 + 1) * 32 + (32 * 25 + 1) * 64 + (576 + 1) * 10
    assert flops_per_sample(spec) == 2 * (20 * 20 * 32 * 25 + 6 * 6 * 64 * 32 * 25 + 576 * 10)


def test_too_small_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="too small"):
        CNN(ModelSpec(1, 10, (12, 12), 8, 16, 0.0))
