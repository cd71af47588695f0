"""Checkpoint converters between fovea and transformers' VLM formats."""
