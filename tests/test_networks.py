"""Tests of the GACC networks: shapes, batched per-column computation, set symmetry."""

import pytest
import torch

from engine_fixtures import torch_single_thread  # noqa: F401
from gacc.networks import (
    ClusterToEntityPredictor,
    Discriminator,
    EntityToClusterPredictor,
    Generator,
    TransformerBlock,
)
from gacc.training import GACCNetworks

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# B sets of N voxels with F token features and C membership columns; all
# different so that a wrong reshape fails.
B, N, F, C = 3, 7, 11, 5


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, F, generator=generator)
    columns = torch.rand(B, C, N, generator=generator)
    flags = (torch.rand(B, C, N, generator=generator) < 0.5).float()
    return tokens, columns, flags


def _seeded(cls, *args, **kwargs):
    torch.manual_seed(3)
    return cls(*args, **kwargs).eval()


def _column_networks():
    """Yield (name, network, call) where call(network, tokens, columns, flags) runs it."""
    yield (
        "discriminator",
        _seeded(Discriminator, F, hidden_size=8, num_heads=2, num_layers=2),
        lambda net, tokens, columns, flags: net(tokens, columns * flags, flags),
    )
    yield (
        "xc_predictor",
        _seeded(EntityToClusterPredictor, F, hidden_size=8, num_heads=2, num_layers=2),
        lambda net, tokens, columns, flags: net(tokens, columns * (1 - flags), flags),
    )
    yield (
        "cx_predictor",
        _seeded(ClusterToEntityPredictor, F, 4, hidden_size=8, num_heads=2, num_layers=2),
        lambda net, tokens, columns, flags: net(tokens, columns),
    )


@pytest.mark.parametrize(
    "name, network, call",
    [pytest.param(*case, id=case[0]) for case in _column_networks()],
)
def test_column_batch_equals_loop(name, network, call):
    tokens, columns, flags = _inputs()
    with torch.no_grad():
        batched = call(network, tokens, columns, flags)
        looped = torch.stack(
            [call(network, tokens, columns[:, c:c + 1], flags[:, c:c + 1]) for c in range(C)],
            dim=1,
        ).squeeze(2)
    assert batched.shape[:2] == (B, C)
    assert looped.shape == batched.shape
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


def test_column_outputs_shapes():
    tokens, columns, flags = _inputs()
    networks = {name: (net, call) for name, net, call in _column_networks()}
    with torch.no_grad():
        discriminator, call = networks["discriminator"]
        assert call(discriminator, tokens, columns, flags).shape == (B, C)
        predictor, call = networks["xc_predictor"]
        assert call(predictor, tokens, columns, flags).shape == (B, C, N)
        predictor, call = networks["cx_predictor"]
        assert call(predictor, tokens, columns, flags).shape == (B, C, N, 4)


def test_column_gradients_stay_per_column():
    # A column's output depends on its own membership values only, never on
    # another column folded into the same batch.
    tokens, columns, flags = _inputs()
    network = _seeded(EntityToClusterPredictor, F, hidden_size=8, num_heads=2)
    columns = columns.clone().requires_grad_(True)
    logits = network(tokens, columns, flags)
    logits[:, 1].sum().backward()
    gradient = columns.grad
    assert gradient[:, 1].abs().sum() > 0
    assert torch.count_nonzero(gradient[:, [0, 2, 3, 4]]) == 0


def test_generator_output_shape():
    generator = _seeded(Generator, F, 6, hidden_size=16, num_heads=4, num_layers=2)
    tokens, _, _ = _inputs()
    with torch.no_grad():
        logits = generator(tokens)
    assert logits.shape == (B, N, 6)
    assert torch.isfinite(logits).all()


def test_generator_permutes_with_set():
    # Sets are unordered: permuting the voxels of a set permutes their logits.
    generator = _seeded(Generator, F, 6, hidden_size=16, num_heads=4, num_layers=2)
    tokens, _, _ = _inputs()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = generator(tokens)
        permuted = generator(tokens[:, order])
    torch.testing.assert_close(permuted, logits[:, order], rtol=1e-5, atol=1e-5)


def test_generator_uses_set_context():
    # A voxel's memberships depend on the other voxels of its set, through
    # attention and the pooled cluster keys.
    generator = _seeded(Generator, F, 6, hidden_size=16, num_heads=4, num_layers=1)
    tokens, _, _ = _inputs()
    changed = tokens.clone()
    changed[:, 1:] = torch.randn(B, N - 1, F, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        first = generator(tokens)[:, 0]
        second = generator(changed)[:, 0]
    assert not torch.allclose(first, second)


def test_sets_are_independent():
    # Sets in one batch never see each other.
    generator = _seeded(Generator, F, 6, hidden_size=16, num_heads=4, num_layers=2)
    tokens, _, _ = _inputs()
    with torch.no_grad():
        together = generator(tokens)
        alone = torch.cat([generator(tokens[b:b + 1]) for b in range(B)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_discriminator_no_visible_voxel():
    # A column with no visible voxel falls back to the plain mean over the set.
    network = _seeded(Discriminator, F, hidden_size=8, num_heads=2)
    tokens, columns, _ = _inputs()
    hidden = torch.zeros_like(columns)
    with torch.no_grad():
        score = network(tokens, hidden, hidden)
    assert score.shape == (B, C)
    assert torch.isfinite(score).all()


def test_transformer_block_rejects_bad_heads():
    with pytest.raises(ValueError, match="hidden_size=10 must be a multiple of num_heads=4"):
        TransformerBlock(10, 4)


def test_networks_use_requested_heads():
    networks = GACCNetworks(12, 36, 5, hidden_size=16, num_heads=4, num_layers=3,
                            column_hidden_size=8)
    assert len(networks.generator.blocks) == 3
    assert all(block.num_heads == 4 for block in networks.generator.blocks)
    for name in ("discriminator", "xc_predictor", "cx_predictor"):
        blocks = getattr(networks, name).encoder.blocks
        assert [block.num_heads for block in blocks] == [4], name


def test_cx_predictor_reconstructs_data_features():
    networks = GACCNetworks(12, 36, 5, hidden_size=16, num_heads=2, column_hidden_size=8)
    masked_tokens = torch.randn(2, 6, 2 * 12 + 36)
    columns = torch.rand(2, 5, 6)
    with torch.no_grad():
        reconstruction = networks.cx_predictor(masked_tokens, columns)
    assert reconstruction.shape == (2, 5, 6, 12)
