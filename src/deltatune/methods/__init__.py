"""Adapter methods; importing this package registers each of them."""

from . import ia3, lora, prompt_tuning  # noqa: F401
