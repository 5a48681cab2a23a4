"""The demo's bars, as `ddistill demo` prints and records them."""
from diffusion_distill.demo import bar_verdicts


def test_each_bar_is_met_on_its_own_side_and_at_its_edge():
    """Catches: an inequality turned round (alignment 0.76x printed as met), FD and alignment
    swapped, seconds compared with the 15-minute bar as if they were minutes, and a missing
    measurement reported as met or missed instead of n/a."""
    # the sd3 demo with the every-layer LoRA: FD 1.11x, alignment 0.76x, 871 s
    v = bar_verdicts(1.11, 0.76, 871.0)
    assert [v[k]["met"] for k in ("fd_ratio", "alignment_ratio", "minutes")] == [True, False, True]
    assert v["minutes"]["value"] == 871.0 / 60
    v = bar_verdicts(1.3, 0.95, 16 * 60)
    assert [v[k]["met"] for k in ("fd_ratio", "alignment_ratio", "minutes")] == [False, True, False]
    v = bar_verdicts(1.2, 0.9, 15 * 60)  # a bar's edge is met
    assert all(b["met"] for b in v.values())
    assert bar_verdicts(None, None, 60)["fd_ratio"]["met"] is None
