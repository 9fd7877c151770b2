"""The DP benchmark's ghost-clipping path computes the same privatized gradient as the
app's ``hooks`` mode, so the times it records compare like with like."""

import torch

from experiments import benchmark_dp
from partitions import DataConfig, dataset_info, load_client_data


def test_ghost_clipping_gradient_equals_hooks():
    info = dataset_info("digits")
    data = load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.1, 0), 0, 4).train
    hooks = benchmark_dp.one_batch_gradient("hooks", data, info)
    ghost = benchmark_dp.ghost_gradient(data, info)
    assert hooks.abs().max() > 1e-3  # a real gradient, not zeros on both sides
    assert torch.allclose(ghost, hooks, rtol=1e-4, atol=1e-6)
    # the comparison can fail: Opacus's make_private alone divides by int(q n)
    _, optimizer, _, _ = benchmark_dp.ghost_private(data, info, 32, 0.0)
    assert optimizer.expected_batch_size == len(data) * benchmark_dp.privacy.sample_rate(len(data), 32)
    assert int(optimizer.expected_batch_size) != optimizer.expected_batch_size
