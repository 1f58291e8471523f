"""Task placement from launcher environments, and the strided shard partition built on it."""

from __future__ import annotations

import pytest

from mcad_core.dist import PlacementError, TaskPlace, explicit_place, local_rank, partition, task_place


def test_empty_env_is_single() -> None:
    assert task_place({}) == TaskPlace(0, 1, "single")


def test_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                 "SLURM_ARRAY_TASK_MAX", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert task_place() == TaskPlace(3, 4, "torchrun")


def test_torchrun() -> None:
    assert task_place({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == TaskPlace(1, 2, "torchrun")


def test_slurm_array_from_zero() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_ARRAY_TASK_MAX": "15"}
    assert task_place(env) == TaskPlace(5, 16, "slurm-array")


def test_slurm_array_offset_by_min() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "16", "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "16"}
    assert task_place(env) == TaskPlace(15, 16, "slurm-array")


def test_slurm_array_without_min_or_max() -> None:
    assert task_place({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == TaskPlace(2, 4, "slurm-array")


def test_slurm_array_with_one_task_per_element() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert task_place(env) == TaskPlace(3, 8, "slurm-array")


def test_slurm_tasks() -> None:
    assert task_place({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}) == TaskPlace(2, 3, "slurm-tasks")


def test_slurm_batch_step_without_ntasks_is_one_task() -> None:
    assert task_place({"SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}) == TaskPlace(0, 1, "slurm-tasks")


def test_blank_values_count_as_unset() -> None:
    assert task_place({"RANK": "", "WORLD_SIZE": " ", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == \
        TaskPlace(1, 2, "slurm-tasks")


def test_torchrun_wins_over_slurm() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert task_place(env) == TaskPlace(5, 8, "torchrun")


def test_array_wins_over_tasks_when_one_task_each() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_PROCID": "0"}
    assert task_place(env) == TaskPlace(1, 4, "slurm-array")


@pytest.mark.parametrize("task_id, procid, expected_rank", [(0, 0, 0), (0, 2, 2), (1, 0, 3), (3, 1, 10), (3, 2, 11)])
def test_array_times_tasks(task_id: int, procid: int, expected_rank: int) -> None:
    env = {"SLURM_ARRAY_TASK_ID": str(task_id + 10), "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
           "SLURM_ARRAY_TASK_MAX": "13", "SLURM_PROCID": str(procid), "SLURM_NTASKS": "3"}
    assert task_place(env) == TaskPlace(expected_rank, 12, "slurm-array")


def test_array_times_tasks_covers_every_rank_once() -> None:
    ranks = [task_place({"SLURM_ARRAY_TASK_ID": str(a), "SLURM_ARRAY_TASK_COUNT": "4",
                         "SLURM_PROCID": str(p), "SLURM_NTASKS": "3"}).rank
             for a in range(4) for p in range(3)]
    assert sorted(ranks) == list(range(12))


@pytest.mark.parametrize("env, names", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, ["RANK", "'one'"]),
    ({"RANK": "0", "WORLD_SIZE": "2.0"}, ["WORLD_SIZE", "'2.0'"]),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, ["SLURM_ARRAY_TASK_ID", "'x'"]),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "a"},
     ["SLURM_ARRAY_TASK_MIN", "'a'"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "many"}, ["SLURM_NTASKS", "'many'"]),
])
def test_non_integer(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(PlacementError, match="not an integer") as err:
        task_place(env)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("env, present, missing", [
    ({"RANK": "0"}, "RANK", "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE", "RANK"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"),
    ({"SLURM_NTASKS": "2"}, "SLURM_NTASKS", "SLURM_PROCID"),
    ({"SLURM_PROCID": "1"}, "SLURM_PROCID", "SLURM_NTASKS"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_NTASKS": "2"}, "SLURM_NTASKS",
     "SLURM_PROCID"),
])
def test_missing_partner(env: dict[str, str], present: str, missing: str) -> None:
    with pytest.raises(PlacementError, match=f"{present}=.* but {missing} is not"):
        task_place(env)


@pytest.mark.parametrize("env, names", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, ["RANK=-1", "WORLD_SIZE=2"]),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, ["SLURM_PROCID=4", "SLURM_NTASKS=4"]),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"},
     ["SLURM_ARRAY_TASK_ID=4", "SLURM_ARRAY_TASK_COUNT=4"]),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
     ["SLURM_ARRAY_TASK_ID=0", "SLURM_ARRAY_TASK_MIN=1"]),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_PROCID": "2", "SLURM_NTASKS": "2"},
     ["SLURM_PROCID=2", "SLURM_NTASKS=2"]),
])
def test_rank_out_of_range(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(PlacementError, match="rank must be in") as err:
        task_place(env)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("env, name", [
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "-2"}, "SLURM_NTASKS=-2"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"}, "SLURM_ARRAY_TASK_COUNT=0"),
])
def test_world_size_below_one(env: dict[str, str], name: str) -> None:
    with pytest.raises(PlacementError, match="world size must be >= 1") as err:
        task_place(env)
    assert name in str(err.value)


def test_non_contiguous_array_is_refused_by_every_task() -> None:
    # --array=0-30:2 -> 16 tasks with ids 0, 2, ..., 30
    for task_id in (0, 2, 30):
        env = {"SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_MAX": "30"}
        with pytest.raises(PlacementError, match="not contiguous") as err:
            task_place(env)
        assert "SLURM_ARRAY_TASK_MAX=30" in str(err.value)


def test_placement_error_is_value_error() -> None:
    assert issubclass(PlacementError, ValueError)


def test_explicit_place() -> None:
    assert explicit_place(2, 5) == TaskPlace(2, 5, "explicit")


@pytest.mark.parametrize("rank, world, match", [
    (5, 5, "rank=5"), (-1, 5, "rank=-1"), (0, 0, "world_size=0"), ("1", 2, "rank='1'"), (0, 2.0, "world_size=2.0"),
    (True, 2, "rank=True"),
])
def test_explicit_place_rejects(rank: object, world: object, match: str) -> None:
    with pytest.raises(PlacementError) as err:
        explicit_place(rank, world)  # type: ignore[arg-type]
    assert match in str(err.value)


def test_taskplace_validates_directly() -> None:
    with pytest.raises(PlacementError):
        TaskPlace(3, 3, "single")
    with pytest.raises(PlacementError, match="unknown placement source"):
        TaskPlace(0, 1, "mpi")


@pytest.mark.parametrize("n", [0, 1, 2, 7, 16, 33, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 16, 17, 200])
def test_partition_covers_every_item_once(n: int, world: int) -> None:
    items = [f"shard-{i:05d}.tar" for i in range(n)]
    shares = [partition(items, explicit_place(rank, world)) for rank in range(world)]
    flat = [item for share in shares for item in share]
    assert sorted(flat) == items
    assert len(flat) == len(set(flat))
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    for rank, share in enumerate(shares):
        assert share == items[rank::world]


def test_partition_world_larger_than_items() -> None:
    items = ["a", "b"]
    assert [partition(items, explicit_place(r, 4)) for r in range(4)] == [["a"], ["b"], [], []]


def test_partition_accepts_tuple_and_range_and_returns_list() -> None:
    assert partition(("a", "b", "c", "d", "e"), explicit_place(1, 2)) == ["b", "d"]
    assert partition(range(10), TaskPlace(2, 3, "single")) == [2, 5, 8]


def test_partition_from_environment() -> None:
    place = task_place({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert partition(list(range(8)), place) == [1, 4, 7]


@pytest.mark.parametrize("env, expected", [
    ({}, 0), ({"LOCAL_RANK": "3", "RANK": "7", "WORLD_SIZE": "8"}, 3), ({"SLURM_LOCALID": "2"}, 2),
    ({"LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, 1), ({"LOCAL_RANK": " ", "SLURM_LOCALID": "4"}, 4),
])
def test_local_rank_picks_this_machines_index(env: dict[str, str], expected: int) -> None:
    assert local_rank(env) == expected


@pytest.mark.parametrize("env, match", [({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
                                        ({"SLURM_LOCALID": "-1"}, "SLURM_LOCALID=-1 is negative")])
def test_local_rank_refuses_garbage(env: dict[str, str], match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        local_rank(env)
