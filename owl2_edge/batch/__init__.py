"""Batch work: many questions answered together (engine), `owl2 batch`'s inputs, resumable
output and its Ray runner (docs/design.md §14)."""
