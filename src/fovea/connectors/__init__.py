"""Connectors from encoder features to LLM tokens: one contract, one registry."""

from fovea.connectors import abstractor as _abstractor  # noqa: F401  (registers c_abstractor)
from fovea.connectors import projection as _projection  # noqa: F401  (registers linear, mlp, avgpool)
from fovea.connectors import resampler as _resampler  # noqa: F401  (registers perceiver, qformer)
from fovea.connectors.abstractor import CAbstractor
from fovea.connectors.base import Connector, available_connectors, budget_grid, build_connector, register_connector
from fovea.connectors.projection import MLP, AvgPool, Linear, LlavaNext
from fovea.connectors.resampler import PerceiverResampler, QFormer

__all__ = [
    "MLP", "AvgPool", "CAbstractor", "Connector", "Linear", "LlavaNext", "PerceiverResampler", "QFormer",
    "available_connectors", "budget_grid", "build_connector", "register_connector",
]
