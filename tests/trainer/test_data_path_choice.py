"""The data path's choice (issue 14): the budget, the reason, the ranks' agreement, the
parameters' checks, and which rows each rank holds; the runs are in test_data_paths.py."""

from __future__ import annotations

import pytest
import torch

from fowlflow.errors import ConfigError, DataError


def test_the_choice_follows_the_budget_and_says_why():
    from fowlflow.trainer.data_path import agree, choose_data_path

    cpu = torch.device("cpu")
    # 1000 training images at resize 37 px (4107 B) + 500 validation at 32 px (3072 B).
    small = choose_data_path("auto", 1000, 500, 32, cpu, budget_gb=0.01, local_processes=1)
    assert small.path == "cache" and small.need_bytes == 1000 * 4107 + 500 * 3072
    assert small.reason.startswith("auto: this process's 1000 training + 500 validation images "
                                   "take 5.4 MiB decoded; the budget is 10.2 MiB "
                                   "(-P memory_budget_gb=0.01): it fits")
    big = choose_data_path("auto", 1000, 500, 32, cpu, budget_gb=0.001, local_processes=1)
    assert big.path == "stream" and "it does not fit, decoded every epoch" in big.reason
    auto = choose_data_path("auto", 10, 5, 32, cpu, budget_gb=0, local_processes=2)
    assert auto.path == "cache" and "host's" in auto.reason and "over 2 processes" in auto.reason
    forced = choose_data_path("stream", 10, 5, 32, cpu, budget_gb=0, local_processes=1)
    assert forced.path == "stream" and forced.reason.startswith("-P data_path=stream: ")
    # The ranks agree: one rank that streams makes every rank stream.
    assert agree([small, big], 0).path == "stream"
    assert "another rank's part does not fit" in agree([small, big], 0).reason
    assert agree([small, small], 1) == small
    # A forced cache that does not fit is refused, naming the fixes.
    too_big = choose_data_path("cache", 1000, 500, 32, cpu, budget_gb=0.001, local_processes=1)
    with pytest.raises(DataError, match="-P data_path=cache, but the cache does not fit .*"
                                        "-P memory_budget_gb"):
        agree([small, too_big], 0)


def test_bad_data_path_values_are_refused():
    from fowlflow.trainer.config import parse_args

    with pytest.raises(ConfigError, match="-P memory_budget_gb=-1.0 is invalid"):
        parse_args(["--memory_budget_gb", "-1"])
    with pytest.raises(SystemExit):
        parse_args(["--data_path", "disk"])
    assert parse_args(["--data_path", " Stream "]).data_path == "stream"


def test_the_sharded_rows_of_the_ranks_are_disjoint_and_complete():
    from fowlflow.trainer import sharding

    for n, world in ((245, 2), (153, 3), (8, 8)):
        parts = [sharding.train_rows(n, 42, r, world) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        vals = [sharding.val_rows(n, r, world) for r in range(world)]
        assert sorted(torch.cat(vals).tolist()) == list(range(n))
    assert sharding.train_rows(10, 42, 0, 1).tolist() == list(range(10))
    assert not torch.equal(sharding.train_rows(100, 1, 0, 2), sharding.train_rows(100, 2, 0, 2))
