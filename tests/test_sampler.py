import pytest

from bpo.data.sampler import micro_batches, steps_per_epoch
from bpo.schedule import lr_multiplier


@pytest.mark.parametrize("world,accum,mb", [(1, 4, 1), (2, 2, 1), (4, 1, 1), (2, 1, 2), (1, 1, 4)])
def test_a_step_sees_the_same_examples_however_it_is_split(world, accum, mb):
    seen = []
    for rank in range(world):
        for batch in micro_batches(23, seed=3, epoch=1, step=2, micro_batch_size=mb, grad_accum=accum,
                                   world_size=world, rank=rank):
            assert len(batch) == mb
            seen += batch
    reference = [i for b in micro_batches(23, 3, 1, 2, 4, 1, 1, 0) for i in b]
    assert sorted(seen) == sorted(reference) and len(set(seen)) == 4


def test_epochs_differ_and_cover_without_repeats():
    n = 10
    per = steps_per_epoch(n, 1, 2, 2)
    assert per == 2
    e0 = [i for s in range(per) for r in range(2) for b in micro_batches(n, 0, 0, s, 1, 2, 2, r) for i in b]
    e1 = [i for s in range(per) for r in range(2) for b in micro_batches(n, 0, 1, s, 1, 2, 2, r) for i in b]
    assert len(set(e0)) == 8 and e0 != e1
    with pytest.raises(IndexError):
        micro_batches(n, 0, 0, per, 1, 2, 2, 0)


def test_lr_schedule():
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(50, 100, 10, schedule="constant") == 1.0
