"""Accuracy evaluations: the held-out reading probe (``fovea.eval.ocr``)."""
