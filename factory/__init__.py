"""factory: a data factory for RLAIF and Constitutional AI (responses, critiques, revisions, preference pairs)."""

__version__ = "0.1.0"
