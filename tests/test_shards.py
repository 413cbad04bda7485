"""Weight shards: a state_dict split into files under a size limit joins back to the same tensors, in order; an
incomplete or foreign set is refused in one line, an older set of the same name is replaced."""
from __future__ import annotations

import pytest
import torch

from utils.checkpoint import CheckpointError, load_shards, save_shards

LIMIT = 200_000  # bytes; small, so that a few small tensors need several shards


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 100, generator=g)
    return {f"layer{i}.weight": torch.randn(40, 1000, generator=g).half() for i in range(6)} | {
        "view": big[:10], "int": torch.arange(5)}


def test_shards_stay_under_the_limit_and_join_to_the_same_state(tmp_path):
    sd = state()
    paths = save_shards(sd, tmp_path, "pair", max_bytes=LIMIT)
    assert len(paths) >= 3 and [p.name for p in paths][0] == f"pair-01-of-{len(paths):02d}.pt"
    assert all(p.stat().st_size <= LIMIT for p in paths)
    joined = load_shards(tmp_path, "pair")
    assert list(joined) == list(sd)
    assert all(torch.equal(joined[k], v) and joined[k].dtype == v.dtype for k, v in sd.items())


def test_a_view_is_saved_without_its_whole_storage(tmp_path):
    big = torch.randn(1000, 1000)
    (path,) = save_shards({"row": big[:1]}, tmp_path, "v", max_bytes=LIMIT)
    assert path.stat().st_size < 100_000


def test_a_new_set_replaces_an_older_one_of_the_same_prefix(tmp_path):
    save_shards(state(), tmp_path, "pair", max_bytes=LIMIT)
    other = save_shards({"x": torch.ones(3)}, tmp_path, "pair-b", max_bytes=LIMIT)
    (one,) = save_shards({"x": torch.ones(3)}, tmp_path, "pair", max_bytes=LIMIT)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([one.name, other[0].name])
    assert list(load_shards(tmp_path, "pair")) == ["x"]


def test_incomplete_foreign_and_oversized_are_refused(tmp_path):
    paths = save_shards(state(), tmp_path, "pair", max_bytes=LIMIT)
    paths[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing: {paths[1].name}"):
        load_shards(tmp_path, "pair")
    torch.save({"a": torch.ones(1)}, paths[1])
    with pytest.raises(CheckpointError, match="not shard 2 of"):
        load_shards(tmp_path, "pair")
    with pytest.raises(CheckpointError, match="no weight shards"):
        load_shards(tmp_path, "other")
    with pytest.raises(ValueError, match="larger than a shard"):
        save_shards({"huge": torch.zeros(LIMIT)}, tmp_path, "h", max_bytes=LIMIT)
