"""scripts/mutate.py: its mutations still apply to the library, and a few of them, run here,
are caught. `python -m scripts.mutate` runs them all against every library test file."""

import pytest

from scripts import mutate


def test_every_mutation_applies_to_exactly_one_place():
    assert mutate.check_targets() == []
    assert len({m.name for m in mutate.MUTATIONS}) == len(mutate.MUTATIONS)


@pytest.mark.slow
@pytest.mark.parametrize(("names", "tests"), [
    (("res-attention-no-logit-scale", "hook-reads-op-output"), ("tests/test_tuner_math.py",)),
    (("bypass-tap-outputs-attached", "bypass-vertical-reads-backbone"), ("tests/test_bypass.py",)),
])
def test_a_few_mutations_are_caught(names, tests):
    chosen = [m for m in mutate.MUTATIONS if m.name in names]
    assert len(chosen) == len(names)
    assert mutate.run(chosen, tests=tests) == []
