"""MathCheckSettings (verification/mathcheck/settings.py)."""

from __future__ import annotations

import pytest

from verification.mathcheck import MathCheckSettings


def test_settings_defaults_and_bounds():
    s = MathCheckSettings()
    assert (s.min_agreement, s.equivalence_timeout_s) == (0.25, 2.0)
    with pytest.raises(ValueError):
        MathCheckSettings(min_agreement=1.5)
    with pytest.raises(ValueError):
        MathCheckSettings(equivalence_timeout_s=0)
