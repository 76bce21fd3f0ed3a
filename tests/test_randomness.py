"""The random generators (ldm_core/randomness.py): each step's draws are a function of the seed, the step and
the process, so a resumed run draws what the uninterrupted one would have."""

import torch

from ldm_core.randomness import step_generator


def test_step_generator_is_reproducible_and_distinct():
    draw = lambda *a: torch.randn(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 7, 0), draw(0, 7, 0))
    assert not torch.equal(draw(0, 7, 0), draw(0, 8, 0))
    assert not torch.equal(draw(0, 7, 0), draw(0, 7, 1))
    assert not torch.equal(draw(0, 7, 0), draw(1, 7, 0))
