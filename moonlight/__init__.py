"""Moonlight-16B-A3B in plain PyTorch."""

from moonlight.config import ModelArgs
from moonlight.model import Moonlight

__all__ = ["ModelArgs", "Moonlight"]
