"""grok1: an engine for xAI's Grok-1."""

__version__ = "0.1.0"
