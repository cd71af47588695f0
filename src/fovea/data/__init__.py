"""Page sources and training data: rendered text for the reading curriculum (``fovea.data.reading``)."""
