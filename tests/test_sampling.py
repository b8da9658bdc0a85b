import random

import pytest

from mbti_lightning.sampling import LengthGroupedSampler, runs_within

_rng = random.Random(0)
LENGTHS = [_rng.randint(150, 290) for _ in range(1000)]


def padded_tokens(batches: list[list[int]]) -> int:
    return sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)


def test_each_row_once_per_epoch_and_far_less_padding():
    grouped = list(LengthGroupedSampler(LENGTHS, 16, shuffle=True))
    plain = list(LengthGroupedSampler(LENGTHS, 16, shuffle=True, megabatch=0))
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
    real = sum(LENGTHS)
    assert 1 - real / padded_tokens(grouped) < 0.03 < 1 - real / padded_tokens(plain)
    assert max(LENGTHS[i] for i in grouped[0]) == max(LENGTHS)  # an OOM shows at the first step


def test_epochs_reshuffle_reproducibly():
    sampler = LengthGroupedSampler(LENGTHS, 16, shuffle=True, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_equal_shares(world):
    shards = [list(LengthGroupedSampler(LENGTHS, 16, shuffle=True, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal step counts, or DDP would hang
    rows = [i for s in shards for b in s for i in b]
    assert len(rows) == len(set(rows)) > 1000 - world * 16


def test_evaluation_is_sorted_and_complete_across_ranks():
    shards = [list(LengthGroupedSampler(LENGTHS, 64, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    rows = [i for s in shards for b in s for i in b]
    assert sorted(rows) == list(range(1000))  # nothing dropped or repeated: metrics see every row once
    assert len({len(s) for s in shards}) == 1 and max(len(b) for s in shards for b in s) <= 64
    (single,) = [list(LengthGroupedSampler(LENGTHS, 64, shuffle=False))]
    flat = [LENGTHS[i] for b in single for i in b]
    assert flat == sorted(flat, reverse=True)


def test_resume_skips_the_batches_already_trained_on_in_the_saved_epoch_only():
    sampler = LengthGroupedSampler(LENGTHS, 16, shuffle=True)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.resume(epoch=1, batches_done=10)
    assert list(sampler) == full[10:] and len(sampler) == len(full)  # Lightning still counts the whole epoch
    assert list(sampler) == full  # only the first pass after the resume is shortened
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    sampler.resume(epoch=0, batches_done=10)  # a state saved in epoch 0 resumes epoch 0's order, whatever came before
    assert list(sampler) == first[10:] and first[10:] != full[10:]


def test_serving_runs_are_sorted_within_the_token_budget_and_cover_every_text_once():
    lengths = [30, 5, 12, 500, 7, 30, 9, 64, 3]
    runs = runs_within(lengths, 64)
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
    flat = [lengths[i] for run in runs for i in run]
    assert flat == sorted(lengths)
    for run in runs:  # a run's padded size stays within the budget, but for a row longer than it, alone
        assert len(run) * max(lengths[i] for i in run) <= 64 or len(run) == 1
    assert runs[-1] == [3] and runs_within([], 64) == []
