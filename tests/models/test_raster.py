import pytest
import torch

from argen.convert.llamagen import load_gpt, raster_config
from argen.errors import ConfigError
from argen.models.interface import Condition, Generator
from argen.models.layers import attention
from argen.models.raster import RasterConfig, RasterTransformer
from argen.models.rope import rope_2d_table
from tests.conftest import PARITY, assert_close_ref, tiny_raster


@pytest.fixture(scope="module")
def official_gpt(llamagen_fixture):
    fields = llamagen_fixture[3]["transformer"]["constructor_args"]["fields"]
    return load_gpt(PARITY / "LlamaGen_transformer.safetensors", raster_config(fields))


def test_rope_table_parity(llamagen_fixture):
    _, ref, meta, _ = llamagen_fixture
    assert_close_ref(rope_2d_table(grid_size=4, head_dim=16), "rope_freqs_cis", ref, meta)


@torch.no_grad()
def test_teacher_forced_logits_parity(official_gpt, llamagen_fixture):
    _, ref, meta, _ = llamagen_fixture
    assert_close_ref(official_gpt(ref["tf_idx"], ref["tf_cond"]), "tf_logits", ref, meta)


@torch.no_grad()
def test_kv_cached_logits_parity(official_gpt, llamagen_fixture):
    _, ref, meta, _ = llamagen_fixture
    state = official_gpt.start(ref["tf_cond"])
    rows = []
    for t in range(16):
        prediction = official_gpt.predict(state)
        rows.append(prediction.logits)
        if t < 15:
            official_gpt.advance(state, prediction.positions, ref["tf_idx"][:, t : t + 1])
    assert_close_ref(torch.cat(rows, dim=1), "kv_tf_logits", ref, meta)


def test_official_key_set(llamagen_fixture):
    fields = llamagen_fixture[3]["transformer"]["constructor_args"]["fields"]
    assert set(llamagen_fixture[0]["transformer"]) == set(RasterTransformer(raster_config(fields)).state_dict())


def tiny(**overrides) -> RasterTransformer:
    return tiny_raster(**overrides)


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("grid", [3, 12])  # 9 and 144 tokens
@torch.no_grad()
def test_kv_cache_step_by_step_equals_teacher_forcing(kv_heads, grid):
    model = tiny(num_kv_heads=kv_heads, grid_size=grid)
    # Scale up the weights so that attention is far from uniform and a position error would show.
    for p in model.parameters():
        p.mul_(8.0) if p.dim() == 2 else None
    L = grid * grid
    ids = torch.randint(0, 32, (2, L))
    labels = torch.tensor([0, 2])
    full = model(ids[:, :-1], labels)
    state = model.start(labels)
    steps = []
    for t in range(L):
        prediction = model.predict(state)
        steps.append(prediction.logits)
        model.advance(state, prediction.positions, ids[:, t : t + 1])
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert state.done and torch.equal(state.tokens, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_rows_beside_rows_at_other_steps_get_the_logits_they_get_alone(dtype):
    from argen.serve.batching import stack

    model = tiny(grid_size=12).to(dtype)  # 144 tokens
    g = torch.Generator().manual_seed(0)
    states = []
    # one row 10 steps in beside two 100 steps in: products of 1, 2 and 3 rows, which BLAS would compute with other
    # kernels than each other's (layers.Linear pads them)
    for labels, steps in (([0], 10), ([2, 1], 100)):
        state = model.start(torch.tensor(labels))
        for _ in range(steps):
            drawn = torch.randint(0, 32, (len(labels), 1), generator=g)
            model.advance(state, model.predict(state).positions, drawn)
        states.append(state)
    alone = [model.predict(s).logits for s in states]
    together = model.predict(stack(states, aligned=False)).logits
    assert torch.equal(together[:1], alone[0]) and torch.equal(together[1:], alone[1])


def test_sdpa_matches_reference_attention():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    assert torch.allclose(attention(q, k, v, mask), attention(q, k, v, mask, use_sdpa=False), atol=1e-5)


def test_satisfies_generator_interface_and_checks_input():
    model = tiny()
    assert isinstance(model, Generator)
    with pytest.raises(ValueError, match="ids must be"):
        model(torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        RasterConfig(dim=30, num_heads=4)


def test_condition_dropout_only_in_training():
    model = tiny()
    model.config.class_dropout = 1.0
    tokens, condition = torch.randint(0, 32, (3, 9)), Condition.classes([0, 1, 2])
    null = Condition.classes([0, 1, 2]).as_null()
    conditional, unconditional = model(tokens[:, :-1], condition), model(tokens[:, :-1], null)
    assert not torch.allclose(conditional, unconditional)
    with torch.no_grad():
        assert not torch.allclose(model.loss(tokens, condition).loss, model.loss(tokens, null).loss)
        model.train()  # every condition dropped: the loss is the unconditional one
        torch.testing.assert_close(model.loss(tokens, condition).loss, model.loss(tokens, null).loss)


def test_input_noise_replaces_training_inputs_only():
    model = tiny_raster(input_noise=0.5, class_dropout=0.0, vocab_size=1000)
    seen = []
    model.tok_embeddings.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    tokens, condition = torch.randint(0, 1000, (64, 9)), Condition.classes([0, 1, 2] * 21 + [0])
    with torch.no_grad():
        clean = model.loss(tokens, condition).loss
        model.train()
        noisy = model.loss(tokens, condition).loss
    torch.testing.assert_close(seen[0], tokens[:, :-1])  # eval: teacher forcing on the clean tokens
    replaced = (seen[1] != tokens[:, :-1]).float().mean().item()
    assert 0.42 < replaced < 0.58  # half the inputs, less the 1/1000 drawn equal to the original
    assert seen[1].max() < 1000 and seen[1].min() >= 0
    assert not torch.allclose(clean, noisy)  # the targets are clean, so the loss sees the corruption
    with pytest.raises(ConfigError, match="input_noise"):
        RasterConfig(input_noise=1.5)
