"""The one registry of generation orders: name -> model class, with its presets.

Everything else an order declares (its position policy, the accelerations that fit it, its own sampler
options, whether it reads the tokenizer, its default guidance) is its `OrderSpec` (`Model.order`). The CLI,
the pipeline and the benches read this registry instead of probing models with hasattr/isinstance; adding an
order is its model file plus one line here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from argen.errors import ConfigError
from argen.models.mar import MAR_PRESETS, MARTransformer
from argen.models.masked import MASKED_PRESETS, MaskedTransformer
from argen.models.next_scale import NEXT_SCALE_PRESETS, NextScaleTransformer
from argen.models.random_order import RANDOM_ORDER_PRESETS, RandomOrderTransformer
from argen.models.raster import RASTER_PRESETS, RasterTransformer

# name -> (model class, presets: preset name -> config)
ORDERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "raster": (RasterTransformer, RASTER_PRESETS),
    "next-scale": (NextScaleTransformer, NEXT_SCALE_PRESETS),
    "random-order": (RandomOrderTransformer, RANDOM_ORDER_PRESETS),
    "masked": (MaskedTransformer, MASKED_PRESETS),
    "mar": (MARTransformer, MAR_PRESETS),
}


def model_class(order: str) -> type[nn.Module]:
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose from {sorted(ORDERS)}")
    return ORDERS[order][0]


def presets() -> dict[str, tuple[str, Any]]:
    """Every generator preset: preset name -> (order name, config)."""
    return {preset: (order, config) for order, (_, table) in ORDERS.items() for preset, config in table.items()}


def order_of_config(config: Any) -> str:
    """The order whose model a config builds."""
    for order, (cls, _) in ORDERS.items():
        if isinstance(config, cls.config_class):
            return order
    raise ConfigError(f"{type(config).__name__} is not the config of any order ({sorted(ORDERS)})")
