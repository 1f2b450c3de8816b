"""Settings that run but rarely do what a user wants get a one-line notice, not an error."""

from __future__ import annotations

import pytest

from pipeline.config import parse_config, weight_range_notice
from tests.models import TINY


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        ({"bits": 2, "init": "minmax"}, True),
        ({"bits": 2, "init": "mse"}, False),
        ({"bits": 4, "granularity": "per-channel", "init": "minmax"}, False),
        ({"bits": 8}, False),
    ],
)
def test_min_max_ranges_at_two_bits_get_a_notice_naming_the_key_and_the_fix(weights, says):
    notice = weight_range_notice(parse_config({**TINY, "quant": {"weights": weights}}))
    assert (notice is not None) == says
    if says:
        assert notice.startswith("quant.weights:") and "init: mse" in notice and "\n" not in notice
