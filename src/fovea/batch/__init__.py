"""Batch reading of a corpus: documents x questions -> a table, on this machine or a Ray cluster."""
