"""Stage 2 of MaskGIT: the bidirectional transformer and its hand-written attention."""
from .attention import MultiHeadAttention
from .transformer import BidirectionalTransformer

__all__ = ["MultiHeadAttention", "BidirectionalTransformer"]
