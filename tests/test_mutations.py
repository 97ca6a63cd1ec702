"""scripts/mutate.py: its mutations still apply to the code, and a few of each class, run here,
are caught. `python -m scripts.mutate` runs them all, each against its class's test files."""

import pytest

from scripts import mutate


def test_every_mutation_applies_to_exactly_one_place():
    assert mutate.check_targets() == []
    assert len({m.name for m in mutate.MUTATIONS}) == len(mutate.MUTATIONS)


@pytest.mark.slow
@pytest.mark.parametrize(("names", "tests"), [
    (("res-attention-no-logit-scale", "hook-reads-op-output"), ("tests/test_tuner_math.py",)),
    (("bypass-tap-outputs-attached", "bypass-vertical-reads-backbone"), ("tests/test_bypass.py",)),
    (("strength-bound-scales-the-whole-attention", "strength-lora-text-encoder-unscaled"), ("tests/test_contracts.py",)),
    (("io-newer-version-accepted", "io-res-tuning-keys-renamed"), ("tests/test_golden.py",)),
    (("loss-min-snr-clamped-below",), (mutate.LOSS_CASE.format("epsilon min-SNR"),)),
])
def test_a_few_mutations_are_caught(names, tests):
    chosen = [m for m in mutate.MUTATIONS if m.name in names]
    assert len(chosen) == len(names)
    assert mutate.run(chosen, tests=tests) == []
