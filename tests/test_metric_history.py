"""The loss-curve PNG a run ends with: one panel per logged value, non-finite points left out."""

import math

import pytest
from PIL import Image

from ldm_core.training.metric_history import MetricHistory


@pytest.mark.loss_curves
def test_save_curves_draws_one_panel_per_logged_key_and_skips_what_has_no_value(tmp_path):
    history = MetricHistory()
    for step in range(1, 6):
        history.add(step, {"loss": 1.0 / step, "kl": math.nan if step == 3 else 0.1 * step,
                           **({"d_loss": float("inf")} if step == 4 else {})})
    path = tmp_path / "curves.png"
    history.save_curves(path, ["loss", "kl", "d_loss", "never_logged"], "a run")
    one = tmp_path / "one.png"
    history.save_curves(one, ["loss"], "a run")
    # 3.2 inches a panel at 110 dpi: "never_logged" gets none; d_loss, logged only as inf, an empty one.
    assert Image.open(path).width == 3 * Image.open(one).width
    history.save_curves(tmp_path / "none.png", ["never_logged"], "a run")
    assert not (tmp_path / "none.png").exists()
