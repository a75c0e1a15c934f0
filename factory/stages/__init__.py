"""Pipeline stages: plain functions over the store (generate, critique, revise, pairs)."""
