"""The per-step line shows what says a run is healthy, not the ~0 token-mean loss."""
from treepo.train.metrics import progress_line


def test_progress_line_shows_health_not_the_whitened_loss():
    m = {"reward/mean": 0.25, "reward/accuracy": 0.375, "response/len_mean": 84.4, "actor/pg_clipfrac": 0.0123,
         "actor/ppo_kl": 1.5e-4, "actor/entropy": 0.8312, "actor/grad_norm": 0.214, "batch/prompts_kept": 6,
         "sampling/compute_saved_vs_sequential": 0.42, "timing/step": 61.26, "timing/gen": 20.1,
         "timing/update": 38.04, "actor/pg_loss": 1e-9}
    line = progress_line(3, 20, m)
    for part in ("step 3/20", "reward +0.250", "acc 0.375", "len 84", "clip 0.012", "kl 1.5e-04", "ent 0.831",
                 "gn 0.214", "kept 6", "saved 42%", "61.3s (gen 20.1 update 38.0)"):
        assert part in line, (part, line)
    assert "loss" not in line
    assert line.startswith("[###")  # 3/20 of the bar


def test_progress_line_before_any_update_metric():
    """A step whose prompts were all dropped has no actor/* metrics: the line still prints."""
    line = progress_line(1, 2, {"reward/mean": 0.0, "timing/step": 1.0})
    assert "clip 0.000" in line and "1.0s" in line
