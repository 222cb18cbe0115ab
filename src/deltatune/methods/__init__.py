"""Adapter methods; importing this package registers each of them."""

from . import ia3, lora  # noqa: F401
