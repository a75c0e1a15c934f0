"""How RayReplicas splits a batch over replicas: contiguous, in order, balanced, nothing lost."""

import pytest

from factory.engines.ray_replicas import split_even


@pytest.mark.parametrize("n,parts", [(0, 2), (1, 2), (2, 2), (7, 2), (8, 3), (100, 8), (5, 1)])
def test_split_even_is_contiguous_balanced_and_covers_everything(n, parts):
    bounds = split_even(n, parts)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    assert len(bounds) == max(1, min(parts, n))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
