"""A training step leaves no autograd graph behind (trainers.dreambooth.train_step): the losses
the loop keeps until they are read (Progress.pending) are detached, and once a step has returned
no tensor holding a graph is alive, so memory does not grow with the steps between reports."""

import gc

import pytest
import torch

from tests.test_trainer import argv, fresh_accelerate_state, instance_dir, run_train, tiny_model  # noqa: F401 (fixtures)
from trainers import dreambooth


def graphs_alive() -> list[torch.Tensor]:
    gc.collect()
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
                found.append(obj)
        except ReferenceError:
            continue
    return found


@pytest.mark.parametrize("method, extra", [("res-tuning", []), pytest.param("lora", ["--gradient_accumulation_steps", "2"],
                                                                            marks=pytest.mark.slow)])
def test_no_graph_outlives_a_training_step(tiny_model, instance_dir, tmp_path, monkeypatch, method, extra):
    seen = []
    after_step = dreambooth.after_step

    def look(training, progress):
        seen.append((len(progress.pending), [t.grad_fn for t in progress.pending], len(graphs_alive())))
        after_step(training, progress)

    monkeypatch.setattr(dreambooth, "after_step", look)
    run_train(argv(tiny_model, instance_dir, tmp_path / "run", "--method", method, "--max_train_steps", 3,
                   "--validation_steps", 100, "--checkpointing_steps", 100, *extra))
    assert len(seen) == 3 and all(n >= 1 for n, _, _ in seen)
    assert all(fn is None for _, fns, _ in seen for fn in fns)
    assert [alive for _, _, alive in seen] == [0, 0, 0]
