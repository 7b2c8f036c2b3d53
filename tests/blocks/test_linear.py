"""LU linear, ActNorm and permutations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from trajflow import BLOCKS
from trajflow.blocks import ActNorm, FixedPermutation, LULinear, Reverse


def test_lu_linear_is_a_per_token_matrix_with_the_matrix_logdet():
    block = LULinear(features=4, seed=3).double()
    with torch.no_grad():
        block.log_diagonal.add_(0.3)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    y, logdet = block(x)
    weight = block.weight()
    torch.testing.assert_close(y, x @ weight.T)
    torch.testing.assert_close(logdet, 6 * torch.linalg.slogdet(weight)[1].expand(2))
    _vector_y, vector_logdet = block(x[:, 0])
    torch.testing.assert_close(vector_logdet, torch.linalg.slogdet(weight)[1].expand(2))


def test_lu_linear_starts_as_a_seeded_rotation():
    first, second = LULinear(5, seed=7), LULinear(5, seed=7)
    torch.testing.assert_close(first.weight(), second.weight())
    weight = first.weight()
    torch.testing.assert_close(weight @ weight.T, torch.eye(5), atol=1e-5, rtol=0)
    assert not torch.allclose(weight, LULinear(5, seed=8).weight())


def test_actnorm_initialises_from_the_first_batch_only():
    norm = ActNorm(3)
    data = torch.tensor([1.0, -2.0, 5.0]) + torch.tensor([0.5, 2.0, 3.0]) * torch.randn(4000, 3)
    z, _ = norm(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(3), atol=1e-3, rtol=0)
    before = norm.bias.detach().clone()
    norm(10 + data)
    torch.testing.assert_close(norm.bias, before)


def test_loaded_actnorm_is_not_reinitialised():
    trained = ActNorm(2)
    trained(torch.randn(100, 2) * 4 + 1)
    loaded = ActNorm(2)
    loaded.load_state_dict(trained.state_dict())
    assert "initialized" in trained.state_dict()
    loaded(torch.randn(100, 2))
    torch.testing.assert_close(loaded.log_scale, trained.log_scale)


def test_actnorm_inverse_before_initialisation_is_the_identity():
    norm = ActNorm(2)
    x = torch.randn(5, 2)
    y, _logdet = norm.inverse(x)
    torch.testing.assert_close(y, x)
    assert not bool(norm.initialized)


RANK_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from trajflow.blocks import ActNorm

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)  # every rank sees different data
norm = ActNorm(3)
norm(torch.randn(50, 3) * (rank + 1) + rank)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as file:
    json.dump({"bias": norm.bias.tolist(), "log_scale": norm.log_scale.tolist()}, file)
dist.destroy_process_group()
"""


def test_actnorm_gives_identical_parameters_on_every_rank_under_torchrun(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    # Pooled statistics: the ranks' data had means 0 and 1, so the pooled mean is about 0.5.
    assert -0.8 < sum(ranks[0]["bias"]) / 3 < -0.2


def test_permutations_reorder_and_undo():
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert Reverse()(x)[0][0, 0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert Reverse(dim=1)(x)[0][0, 0].tolist() == [8.0, 9.0, 10.0, 11.0]
    perm = FixedPermutation(4, seed=5)
    y, logdet = perm(x)
    assert torch.equal(perm.inverse(y)[0], x) and torch.equal(logdet, torch.zeros(1))
    assert torch.equal(FixedPermutation(4, seed=5).index, perm.index)


def test_permutation_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        Reverse(dim=1)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="size 4"):
        FixedPermutation(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="dim -1"):
        Reverse(dim=0)


def test_specs_build_every_linear_block():
    for spec in [
        {"name": "lu_linear", "kwargs": {"features": 3}},
        {"name": "actnorm", "kwargs": {"features": 3}},
        "reverse",
        {"name": "fixed_permutation", "kwargs": {"features": 3, "seed": 1}},
    ]:
        block = BLOCKS.build(spec)
        assert block(torch.randn(2, 3))[0].shape == (2, 3)
