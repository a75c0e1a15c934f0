"""Inference engines behind one small Protocol (see base.py). One file per backend."""

from factory.engines.base import Completion, Engine, create_engine

__all__ = ["Completion", "Engine", "create_engine"]
