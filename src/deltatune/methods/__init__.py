"""Adapter methods; importing this package registers each of them."""

from . import lora  # noqa: F401
