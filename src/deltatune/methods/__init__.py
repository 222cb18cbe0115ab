"""Adapter methods; importing this package registers each of them."""

from . import adalora, ia3, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401
