import pytest
import torch

from argen.convert.var import load_transformer, load_vqvae, transformer_config
from argen.sampling.decode import SamplerConfig, generate
from tests.conftest import PARITY, assert_close_ref
from tests.tokenizers.test_multiscale import FIXTURE


@pytest.fixture(scope="module")
def official(var_fixture):
    fields = var_fixture[3]["transformer"]["constructor_args"]
    vq = load_vqvae(PARITY / "VAR_tokenizer.safetensors", FIXTURE)
    gen = load_transformer(PARITY / "VAR_transformer.safetensors", transformer_config(fields, 16, 1024))
    return gen.bind(vq), vq


@torch.no_grad()
def test_teacher_forced_logits_parity(official, var_fixture):
    gen, _ = official
    _, ref, meta, _ = var_fixture
    assert_close_ref(gen(ref["tf_x_BLCv_wo_first_l"], ref["tf_label"]), "tf_logits", ref, meta)
    tokens = torch.cat([ref[f"tok_idx_s{s}"] for s in range(4)], dim=1)
    assert_close_ref(gen.training_inputs(tokens), "tf_x_BLCv_wo_first_l", ref, meta)


@torch.no_grad()
def test_kv_cached_scale_by_scale_equals_teacher_forcing(official, var_fixture):
    gen, _ = official
    _, ref, meta, _ = var_fixture
    state = gen.start(ref["tf_label"])
    rows = []
    for s in range(4):
        rows.append(gen.predict(state))
        gen.advance(state, ref[f"tok_idx_s{s}"])
    logits = torch.cat(rows, dim=1)
    assert_close_ref(logits[:, :5], "kv_tf_logits_first2scales", ref, meta)
    assert_close_ref(logits, "tf_logits", ref, meta)  # all 30 rows, not only the two stored scales


@torch.no_grad()
def test_greedy_guided_sampling_parity(official, var_fixture):
    gen, vq = official
    _, ref, meta, _ = var_fixture
    ids = generate(gen, ref["greedy_label"], SamplerConfig(cfg_scale=4.0, cfg_schedule="var_ramp", greedy=True))
    assert_close_ref(ids, "greedy_idx", ref, meta)
    f_hat = vq.quantize.ids_to_fhat(vq.split(ids), 4)
    assert_close_ref(f_hat, "greedy_fhat", ref, meta)
    assert_close_ref((vq.decode(ids) + 1) / 2, "greedy_image", ref, meta)


def test_official_key_set(official, var_fixture):
    gen, vq = official
    assert set(var_fixture[0]["transformer"]) == set(gen.state_dict())
