"""The examples run as the README shows them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_combine_and_hotswap_example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import combine_and_hotswap
    finally:
        sys.path.pop(0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # the swap must not recompile
        result = combine_and_hotswap.main()
    assert result["swap_diff"] <= 1e-5 and result["changed"] > 1e-3


def test_mixed_batch_example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import mixed_batch
    finally:
        sys.path.pop(0)
    result = mixed_batch.main()
    assert result["max_diff"] <= 1e-5 and result["same_tokens"]
