"""MaskGIT's bidirectional transformer in the lab's exact parameter layout (lab checkpoints load strictly)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.image import IMAGE_SIZE

from .attention import Dropout, MultiHeadAttention

LN_EPS = 1e-12  # the lab's value; kept so lab-trained weights give identical outputs
ADAMW_IMPLEMENTATIONS = ("for-loop", "foreach", "fused")  # torch.optim.AdamW's three code paths, same update rule
# the fastest measured (benchmarks/train_throughput.py --variants): on CUDA, and on the CPU by 1-4 % over torch's
# CPU default (foreach) in six of six runs on the Xeon with AMX (docs/SPEED.md)
DEFAULT_ADAMW = "fused"
# The training forward's last layer and output head run on the masked rows, padded to a multiple of this: their
# count changes every step, and the CPU's oneDNN builds and caches a matmul kernel per shape, which grew a training
# process by ~10 MB per step (10 GB after 1,400 steps); padded, each matmul has at most 8192 / 256 = 32 shapes at
# batch 32.
MASKED_ROW_BUCKET = 256


class EncoderLayer(nn.Module):
    """Post-norm layer: x = LN1(x + drop(Attn(x))); x = LN2(x + MLP(x)).

    Only the attention's heads mix positions; with `rows` (indices into the flattened [B*N] positions) everything
    after them runs on those rows alone and the layer returns [len(rows), dim]: the output of the last layer is
    needed at the masked positions only.
    """

    def __init__(self, dim: int, hidden_dim: int, num_heads: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.Attention = MultiHeadAttention(dim, num_heads, attn_dropout)
        self.LayerNorm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.LayerNorm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.MLP = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim), Dropout(dropout))
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        heads = self.Attention.heads(x)
        if rows is not None:
            x, heads = x.flatten(0, 1).index_select(0, rows), heads.flatten(0, 1).index_select(0, rows)
        x = self.LayerNorm1(x + self.dropout(self.Attention.proj(heads)))
        return self.LayerNorm2(x + self.MLP(x))


def known_pixel_patches(images: torch.Tensor, pixel_known: torch.Tensor, latent_resolution: int) -> torch.Tensor:
    """What a position sees of its own patch: normalized images [B, 3, H, W] with every hole pixel zeroed, and
    pixel_known (bool [B, 1, H, W] or [B, H, W], True = known) -> [B, latent_resolution**2, 4 * p * p] for p x p
    patches, in the tokens' row-major order: the patch's RGB (channel-major) then its known-pixel mask. Hole pixels
    enter as exact zeros whatever the image holds there, so no hole pixel can reach the transformer."""
    known = pixel_known.to(images.dtype).view(len(images), 1, *images.shape[-2:])
    patch = images.shape[-1] // latent_resolution
    features = torch.cat([images * known, known], dim=1)  # [B, 4, H, W]
    return F.unfold(features, kernel_size=patch, stride=patch).transpose(1, 2)


class BidirectionalTransformer(nn.Module):
    """Predicts a distribution over codebook ids (plus the mask id) at every one of the image's token positions.

    cfg keys: num_image_tokens, num_codebook_vectors, dim, n_layers, hidden_dim; optional num_heads (16),
    dropout (0.1) and attn_dropout (default: dropout), the dropout on the attention probabilities, which on the
    CPU costs more than the rest together ([B, heads, N, N] random draws). The output head is tied to the token
    embedding: logits = h @ tok_emb.weight^T + bias.

    Optional pixel_conditioning (false) and image_size (IMAGE_SIZE): the lab's latent rule masks a token
    whose patch is only partly covered by the hole, so the token alone never tells the transformer what its known
    pixels show. With it every position also gets `pixel_emb` of its patch of the masked image
    (known_pixel_patches: RGB with the hole zeroed, and the known-pixel mask) added to its token or [MASK]
    embedding. pixel_emb is zero-initialised and registered last (the lab's layout stays a prefix of the
    state_dict), so a checkpoint without it is exactly this model at its first step (with_pixel_conditioning).
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim = cfg["dim"]
        self.num_image_tokens = cfg["num_image_tokens"]
        self.num_codebook_vectors = cfg["num_codebook_vectors"]
        self.mask_token_id = self.num_codebook_vectors  # the extra, last embedding row
        dropout = cfg.get("dropout", 0.1)
        attn_dropout = cfg.get("attn_dropout", dropout)
        # registration order fixes the state_dict order, which must match the lab's
        self.pos_emb = nn.Parameter(torch.zeros(self.num_image_tokens, dim))
        self.bias = nn.Parameter(torch.zeros(self.num_image_tokens, self.num_codebook_vectors + 1))
        self.tok_emb = nn.Embedding(self.num_codebook_vectors + 1, dim)
        self.blocks = nn.Sequential(*[EncoderLayer(dim, cfg["hidden_dim"], cfg.get("num_heads", 16), dropout, attn_dropout)
                                      for _ in range(cfg["n_layers"])])
        self.Token_Prediction = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=LN_EPS))
        self.LN = nn.LayerNorm(dim, eps=LN_EPS)
        self.drop = Dropout(dropout)
        nn.init.trunc_normal_(self.pos_emb, 0.0, 0.02)
        self.apply(_init_weights)
        # built after the lab's init, so that every other weight is drawn as without it
        self.pixel_conditioning = bool(cfg.get("pixel_conditioning", False))
        if self.pixel_conditioning:
            self.latent_resolution = math.isqrt(self.num_image_tokens)
            patch = cfg.get("image_size", IMAGE_SIZE) // self.latent_resolution
            self.pixel_emb = nn.Linear(4 * patch * patch, dim)
            nn.init.zeros_(self.pixel_emb.weight)
            nn.init.zeros_(self.pixel_emb.bias)

    def with_pixel_conditioning(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state_dict saved without pixel conditioning, completed with this model's zero pixel_emb: the same
        function, now able to learn from the known pixels (e.g. a trunk continued with conditioning)."""
        if not self.pixel_conditioning or any(k.startswith("pixel_emb.") for k in state_dict):
            return state_dict
        return {**state_dict, **{f"pixel_emb.{k}": torch.zeros_like(v) for k, v in self.pixel_emb.state_dict().items()}}

    def embed(self, tokens: torch.Tensor, pixels: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The input of the first layer: token + position (+ pixel_emb of the known pixels) embeddings, normalized."""
        x = self.tok_emb(tokens) + self.pos_emb
        if self.pixel_conditioning:
            if pixels is None:
                raise ValueError("this transformer has pixel_conditioning: pass pixels=(normalized images, "
                                 "pixel_known)")
            patches = known_pixel_patches(*pixels, self.latent_resolution)
            x = x + self.pixel_emb(patches.to(self.pixel_emb.weight.dtype))
        return self.drop(self.LN(x))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                pixels: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens: LongTensor [B, num_image_tokens], ids in [0, mask_token_id] -> logits [B, num_image_tokens, ids].

        `pixels` (normalized images [B, 3, H, W], pixel_known bool [B, 1, H, W]) is required with pixel_conditioning
        and ignored without it.

        With `mask` (bool [B, num_image_tokens]) only the logits of the masked positions, [M, ids] in the order of
        logits[mask]: the training loss needs no others, so everything after the last layer's attention heads (its
        W_O, LayerNorms and MLP, Token_Prediction, the [dim, ids] output head, the bias and the loss's softmax over
        1025 ids, forward and backward) costs in proportion to the masked share, 2/pi on average under the cosine
        schedule and less inside holes; it runs on the masked rows padded to a multiple of MASKED_ROW_BUCKET.
        """
        h = self.embed(tokens, pixels)
        device = tokens.device.type
        if torch.is_autocast_enabled(device):
            # keep the residual stream in the autocast dtype: on the CPU this spares a cast before every Linear
            # and mixed-dtype adds (~6% of a training step) for a slightly larger error (logits 1.6% vs 1.3% off fp32)
            h = h.to(torch.get_autocast_dtype(device))
        if mask is None:
            return torch.matmul(self.Token_Prediction(self.blocks(h)), self.tok_emb.weight.t()) + self.bias
        rows = mask.flatten().nonzero().squeeze(1)  # row-major, as boolean indexing orders them
        count = len(rows)
        padded = torch.cat([rows, rows.new_zeros(-count % MASKED_ROW_BUCKET)])  # padding: row 0, sliced off below
        *body, last = self.blocks  # (slicing an nn.Sequential would build a new module every step)
        for block in body:
            h = block(h)
        h = self.Token_Prediction(last(h, padded))
        logits = torch.matmul(h, self.tok_emb.weight.t())[:count]
        return logits + self.bias.index_select(0, rows % self.num_image_tokens)

    def configure_optimizers(self, learning_rate: float, betas: tuple[float, float], weight_decay: float,
                             implementation: str | None = None) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices only: biases, LayerNorms and the [N, ids] output bias (a
        per-position prior, not a weight matrix) are not decayed (nanoGPT's rule). `implementation` is one of
        ADAMW_IMPLEMENTATIONS, by default DEFAULT_ADAMW. A resumed optimizer keeps the implementation its checkpoint
        was saved with (load_state_dict restores the group's flags); the update rule is the same."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if p.dim() >= 2 and n != "bias"], "weight_decay": weight_decay},
                  {"params": [p for n, p in params if p.dim() < 2 or n == "bias"], "weight_decay": 0.0}]
        implementation = implementation or DEFAULT_ADAMW
        if implementation not in ADAMW_IMPLEMENTATIONS:
            raise ValueError(f"AdamW implementation {implementation!r}; choose one of {', '.join(ADAMW_IMPLEMENTATIONS)}")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=implementation == "fused",
                                 foreach=implementation == "foreach")


def _init_weights(module: nn.Module) -> None:
    """The lab's init: trunc_normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
