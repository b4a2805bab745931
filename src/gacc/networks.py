"""The four GACC networks: generator, discriminator and two cooperative predictors.

Shapes use B sets per batch, N voxels per set, F token features (the scaled
data values T plus the positional encoding E), K generated clusters and C
membership columns that a per-column network reads at once. Every per-column
network folds the column axis into the batch axis, so all K clusters go
through one batched tensor operation and no Python loop runs over clusters.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ClusterToEntityPredictor",
    "Discriminator",
    "EntityToClusterPredictor",
    "Generator",
    "TransformerBlock",
]


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block over the voxels of a set.

    Sets are unordered, so the block has no causal mask and no positional
    term of its own: where a voxel lies reaches it through its features.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=2, dropout=0.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}."
            )
        self.num_heads = num_heads
        self.dropout = dropout
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attention_out = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size),
            nn.GELU(),
            nn.Linear(mlp_ratio * hidden_size, hidden_size),
        )

    def forward(self, x):
        # x: (S, N, H) for S sequences of N voxels.
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        # (S, heads, N, H / heads)
        q, k, v = (
            t.reshape(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v)
        )
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)  # (S, N, H)
        x = x + self.attention_out(attended)
        return x + self.mlp(self.mlp_norm(x))


class Generator(nn.Module):
    """Map a set of voxels to their memberships in K clusters.

    Transformer blocks give a hidden vector per voxel. The voxel head turns it
    into a query per voxel. The cluster head pools the set once per cluster
    (attention pooling with a learned score per cluster) and projects the
    pooled vector with a per-cluster matrix into a key per cluster. Their
    scaled dot products, through a per-cluster affine map, are the
    membership logits.
    """

    def __init__(self, num_features, num_clusters, hidden_size=64, num_heads=4, num_layers=2):
        super().__init__()
        self.num_clusters = num_clusters
        self.embed = nn.Linear(num_features, hidden_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.voxel_head = nn.Linear(hidden_size, hidden_size)
        self.pool_scores = nn.Linear(hidden_size, num_clusters)
        self.cluster_projection = nn.Parameter(
            torch.randn(num_clusters, hidden_size, hidden_size) / math.sqrt(hidden_size)
        )
        self.cluster_bias = nn.Parameter(torch.zeros(num_clusters, hidden_size))
        self.logit_scale = nn.Parameter(torch.ones(num_clusters))
        self.logit_bias = nn.Parameter(torch.zeros(num_clusters))

    def forward(self, tokens):
        """Return membership logits of shape (B, N, K) for tokens of shape (B, N, F)."""
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)  # (B, N, H)

        queries = self.voxel_head(h)  # (B, N, H)
        pool_weights = torch.softmax(self.pool_scores(h), dim=1)  # (B, N, K), sums to 1 over N
        pooled = torch.einsum("bnk,bnh->bkh", pool_weights, h)  # (B, K, H)
        keys = torch.einsum("bkh,khg->bkg", pooled, self.cluster_projection)
        keys = keys + self.cluster_bias  # (B, K, H)

        scores = torch.einsum("bnh,bkh->bnk", queries, keys) / math.sqrt(h.shape[-1])
        return scores * self.logit_scale + self.logit_bias  # (B, N, K)


class _ColumnEncoder(nn.Module):
    """Shared trunk of the per-column networks.

    The input of a per-column network is a set's voxel tokens (B, N, F)
    joined with C columns of per-voxel values (B, C, N, V), such as a
    membership column and its visibility. A linear embedding of the joined
    vector equals the embedding of the tokens plus the embedding of the
    column values, so the tokens are embedded once per set and broadcast over
    the C columns instead of being copied C times.
    """

    def __init__(self, num_features, num_column_values, hidden_size, num_heads, num_layers):
        super().__init__()
        self.token_embed = nn.Linear(num_features, hidden_size)
        self.column_embed = nn.Linear(num_column_values, hidden_size, bias=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, tokens, column_values):
        batch, columns, length, _ = column_values.shape
        h = self.token_embed(tokens).unsqueeze(1) + self.column_embed(column_values)  # (B, C, N, H)
        h = h.reshape(batch * columns, length, -1)  # (B * C, N, H)
        for block in self.blocks:
            h = block(h)
        return self.norm(h).reshape(batch, columns, length, -1)  # (B, C, N, H)


class Discriminator(nn.Module):
    """Score whether a membership column is a real cluster or a generated one.

    Each column comes with a visibility flag per voxel: real columns are
    shown only on their known entries, and generated columns are shown on
    the same kind of pattern, so the flags alone cannot tell them apart.
    """

    def __init__(self, num_features, hidden_size=32, num_heads=4, num_layers=1):
        super().__init__()
        self.encoder = _ColumnEncoder(num_features, 2, hidden_size, num_heads, num_layers)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, tokens, columns, visible):
        """Return one logit per column, shape (B, C).

        tokens (B, N, F); columns and visible (B, C, N), with hidden entries of
        ``columns`` already set to 0.
        """
        values = torch.stack((columns, visible), dim=-1)  # (B, C, N, 2)
        h = self.encoder(tokens, values)
        # Mean over the visible voxels; a column with none visible takes the plain mean.
        count = visible.sum(dim=2, keepdim=True)  # (B, C, 1)
        weights = torch.where(count > 0, visible / count.clamp(min=1.0), 1.0 / visible.shape[2])
        pooled = (h * weights.unsqueeze(-1)).sum(dim=2)  # (B, C, H)
        return self.head(pooled).squeeze(-1)


class EntityToClusterPredictor(nn.Module):
    """Cooperative predictor C x->c: complete a partly hidden membership column.

    From the voxels' features, the visible part of a column and the hiding
    mask, it predicts the whole column (logits per voxel).
    """

    def __init__(self, num_features, hidden_size=32, num_heads=4, num_layers=1):
        super().__init__()
        self.encoder = _ColumnEncoder(num_features, 2, hidden_size, num_heads, num_layers)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, tokens, visible_columns, hidden):
        """Return logits (B, C, N); visible_columns and hidden are (B, C, N)."""
        values = torch.stack((visible_columns, hidden), dim=-1)  # (B, C, N, 2)
        return self.head(self.encoder(tokens, values)).squeeze(-1)


class ClusterToEntityPredictor(nn.Module):
    """Cooperative predictor C c->x: reconstruct hidden voxel features from a column.

    Its tokens are the voxels' data with a random part hidden, the hiding
    mask and the positional encoding (shared by all columns of a set); each
    column adds one membership value per voxel. It returns the reconstructed
    data values (B, C, N, T).
    """

    def __init__(self, num_token_features, num_data_features, hidden_size=32, num_heads=4,
                 num_layers=1):
        super().__init__()
        self.encoder = _ColumnEncoder(num_token_features, 1, hidden_size, num_heads, num_layers)
        self.head = nn.Linear(hidden_size, num_data_features)

    def forward(self, masked_tokens, columns):
        """Return reconstructions (B, C, N, T); masked_tokens (B, N, F'), columns (B, C, N)."""
        return self.head(self.encoder(masked_tokens, columns.unsqueeze(-1)))
