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
    # the new classes against the one test that targets each, so that make test pays for little more
    (("strength-bound-scales-the-whole-attention", "strength-bound-squared"),
     ("tests/test_contracts.py::test_bound_prefix_and_prompt_strength_is_their_unbound_form",)),
    (("io-newer-version-accepted", "io-fingerprint-missing-field-passes"),
     ("tests/test_golden.py::test_a_file_of_a_newer_format_version_is_refused_saying_to_upgrade",
      "tests/test_golden.py::test_a_fingerprint_missing_any_field_is_refused")),
    (("loss-min-snr-clamped-below",), (mutate.LOSS_CASE.format("epsilon min-SNR"),)),
    (("bypass-x0-from-tap-output",), (mutate.BYPASS_CASE.format("test_the_network_reads_x0_and_each_tap_where_the_docstring_says"),)),
    (("route-root-by-string-prefix", "caps-comparison-counts-as-one"), (mutate.FILES_RULES, mutate.LIMITS_RULES)),
])
def test_a_few_mutations_are_caught(names, tests):
    chosen = [m for m in mutate.MUTATIONS if m.name in names]
    assert len(chosen) == len(names)
    assert mutate.run(chosen, tests=tests) == []
