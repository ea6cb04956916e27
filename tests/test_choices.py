"""The closed sets (zptr.choices): members are their names, parsed once with a one-line error."""

from __future__ import annotations

import json

import pytest

from zptr.choices import (BENCH_MODES, EVAL_MODES, OMEGA_MODES, REQUEST_MODES, FinishReason, OmegaMode,
                          RotationKind)
from zptr.errors import ConfigError, OmegaModeError


def test_members_read_as_their_names():
    assert OmegaMode.FAST == "fast" and hash(OmegaMode.FAST) == hash("fast")
    assert f"{OmegaMode.FAST} {OmegaMode.FAST!r} {str(FinishReason.STOP)}" == "fast 'fast' stop"
    assert json.dumps({"mode": OmegaMode.EXACT}) == '{"mode": "exact"}'


def test_the_mode_sets_agree():
    assert OMEGA_MODES == ("auto", "off", "exact", "fast")
    assert set(REQUEST_MODES) == set(OMEGA_MODES) - {"auto"}
    assert set(BENCH_MODES) == set(REQUEST_MODES) and set(EVAL_MODES) < set(REQUEST_MODES)


def test_parse_names_what_and_the_choices():
    assert RotationKind.parse("dense", "rotation", ConfigError) is RotationKind.DENSE
    with pytest.raises(ConfigError, match=r"^rotation 'so9' is not one of so8, dense$"):
        RotationKind.parse("so9", "rotation", ConfigError)
    with pytest.raises(OmegaModeError, match=r"^omega mode 'auto' is not one of off, exact, fast$"):
        OmegaMode.parse("auto", "omega mode", OmegaModeError, REQUEST_MODES)
    with pytest.raises(OmegaModeError):
        OmegaMode.parse(None, "omega mode", OmegaModeError)
