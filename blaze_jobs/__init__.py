"""Blaze Jobs: an asynchronous job queue for generative AI."""

__version__ = "0.1.0"
