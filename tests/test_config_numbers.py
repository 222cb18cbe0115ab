"""Config numbers: NaN and infinities are refused (every comparison with NaN is false: a range check
written as ``value <= low`` lets it through); pattern fields must be dicts."""

from __future__ import annotations

import pytest

import deltatune as dt


@pytest.mark.parametrize("field,value", [("lora_alpha", float("nan")), ("lora_alpha", float("inf")),
                                         ("lora_dropout", float("nan")), ("lora_dropout", float("-inf"))])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(dt.ConfigError, match=field):
        dt.LoraConfig(target_modules=["q"], **{field: value})


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_patterns_must_be_dicts(field):
    with pytest.raises(dt.ConfigError, match=field):
        dt.LoraConfig(target_modules=["q"], **{field: None})
