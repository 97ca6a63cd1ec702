"""scripts/mutate.py: its mutations still apply to the library, and a few of them, run here,
are caught. `python -m scripts.mutate` runs them all against every library test file."""

import pytest

from scripts import mutate


def test_every_mutation_applies_to_exactly_one_place():
    assert mutate.check_targets() == []
    assert len({m.name for m in mutate.MUTATIONS}) == len(mutate.MUTATIONS)


@pytest.mark.slow
def test_a_few_mutations_are_caught():
    chosen = [m for m in mutate.MUTATIONS if m.name in ("res-attention-no-logit-scale", "hook-reads-op-output")]
    assert len(chosen) == 2
    assert mutate.run(chosen, tests=("tests/test_tuner_math.py",)) == []
