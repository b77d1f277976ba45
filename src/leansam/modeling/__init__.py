"""Model building blocks; module trees and state-dict keys match the upstream references."""

from .sam import Sam

__all__ = ["Sam"]
