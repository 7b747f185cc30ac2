"""nn.Module wrappers: parameters and configuration only, the math lives in dynkernels.ops."""

from .evolving_attention import EvolvingAttention, EvolvingTransformerEncoder, EvolvingTransformerEncoderLayer
from .isda import ISDAConsistencyLoss, ISDALoss
from .pointformer import (
    CONFIGS,
    CoordinateRefinement,
    GlobalTransformer,
    LocalGlobalTransformer,
    LocalTransformer,
    PointformerBackbone,
    PointformerBlock,
    PointFPModule,
)
from .pointformer_layers import PointformerDecoderLayer, PointformerEncoderLayer, PositionEncoding
from .pointops import QueryAndGroup

__all__ = [
    "CONFIGS",
    "CoordinateRefinement",
    "EvolvingAttention",
    "EvolvingTransformerEncoder",
    "EvolvingTransformerEncoderLayer",
    "GlobalTransformer",
    "ISDAConsistencyLoss",
    "ISDALoss",
    "LocalGlobalTransformer",
    "LocalTransformer",
    "PointFPModule",
    "PointformerBackbone",
    "PointformerBlock",
    "PointformerDecoderLayer",
    "PointformerEncoderLayer",
    "PositionEncoding",
    "QueryAndGroup",
]
