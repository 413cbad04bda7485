"""Stage 2 of MaskGIT: the bidirectional transformer and its hand-written attention."""
from .attention import MultiHeadAttention
from .transformer import ADAMW_IMPLEMENTATIONS, BidirectionalTransformer

__all__ = ["ADAMW_IMPLEMENTATIONS", "MultiHeadAttention", "BidirectionalTransformer"]
