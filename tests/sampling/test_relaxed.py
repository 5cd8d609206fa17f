import pytest
import torch

from argen.sampling.decode import SamplerConfig, generate, seeded_generators
from argen.sampling.relaxed import code_neighbours, relaxed_mass
from argen.sampling.speculative import SpeculativeStats, _accept, generate_speculative
from tests.sampling.test_speculative import peaked


def test_neighbours_are_the_closest_other_codes_in_order():
    codebook = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    near = code_neighbours(codebook, 2)
    assert near.tolist()[0] == [1, 3] and near.tolist()[2] == [3, 1] and near.tolist()[4] == [2, 3]
    with pytest.raises(ValueError, match="relax_k"):
        code_neighbours(codebook, 5)


def test_relaxed_mass_borrows_from_the_closest_codes_within_delta():
    neighbours = torch.tensor([[1, 2], [0, 2], [1, 0]])
    p = torch.tensor([[0.1, 0.3, 0.6]])
    q = torch.tensor([[0.5, 0.2, 0.3]])
    p_set, q_set = relaxed_mass(torch.tensor([0]), p, q, neighbours, delta=0.35)
    assert p_set.item() == pytest.approx(0.4) and q_set.item() == pytest.approx(0.7)  # code 1 only: 0.3 + 0.6 > 0.35
    p_set, q_set = relaxed_mass(torch.tensor([0]), p, q, neighbours, delta=0.0)
    assert p_set.item() == pytest.approx(0.1) and q_set.item() == pytest.approx(0.5)  # delta 0: exact


def _sample(config, n, codebook, stats=None):
    target, draft = peaked(), peaked(seed=1, scale=1.0)  # a flatter draft model: many exact rejections
    return generate_speculative(
        target, torch.ones(n, dtype=torch.long), config, seeded_generators(range(n)), None, draft, stats, codebook
    )


def test_delta_zero_is_the_exact_sampler():
    codebook = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])
    exact = _sample(SamplerConfig.from_flat(dict(speculative="draft", window=3)), 300, None)
    same = _sample(
        SamplerConfig.from_flat(dict(speculative="draft", window=3, relax_k=1, relax_delta=0.0)), 300, codebook
    )
    assert torch.equal(same, exact)


def test_a_draft_on_a_close_code_is_accepted_where_exact_acceptance_halves():
    """Target split between two similar codes 0 and 1, draft always proposing code 0: the exact rule keeps it
    with probability p/q = 0.5, the relaxed one (code 1 lends its 0.5 <= delta) always."""
    neighbours = torch.tensor([[1, 2], [0, 2], [1, 0]])
    n = 4000
    p = torch.tensor([0.5, 0.5, 0.0]).expand(n + 1, 3)
    q = torch.tensor([1.0, 0.0, 0.0]).expand(n, 3)
    drafts = torch.zeros(n, dtype=torch.long)
    kept = {}
    for delta in (0.0, 0.6):
        config = SamplerConfig.from_flat(dict(speculative="draft", relax_k=1, relax_delta=delta))
        stats, g = SpeculativeStats(), torch.Generator().manual_seed(0)
        # _accept stops at the first rejection: count acceptances draft by draft
        for i in range(n):
            _accept(drafts[i : i + 1], q[i : i + 1], p[i : i + 2], g, config, stats, neighbours)
        kept[delta] = stats.accepted / n
    assert kept[0.0] == pytest.approx(0.5, abs=0.03) and kept[0.6] == 1.0


def test_relaxed_acceptance_errors():
    with pytest.raises(ValueError, match="set speculative"):
        SamplerConfig.from_flat(dict(relax_k=4))
    with pytest.raises(ValueError, match="codebook"):
        generate(peaked(), torch.tensor([0]), SamplerConfig.from_flat(dict(speculative="sjd", relax_k=1)))


def test_the_pipeline_hands_its_codebook_to_relaxed_acceptance():
    from argen.pipeline import ARPipeline

    pipe = ARPipeline.from_pretrained("default")
    out = pipe([3, 5], seed=0, speculative="sjd", relax_k=8, relax_delta=0.2, output_type="pt")
    assert out.images.shape == (2, 1, 28, 28) and out.tokens.shape == (2, 49)
    assert ((out.tokens >= 0) & (out.tokens < pipe.generator.vocab_size)).all()
    # the pipeline reports how speculation went: 49 tokens each in fewer passes, some drafts kept
    assert 0 < out.speculative.target_passes < 49 and 0 < out.speculative.acceptance_rate < 1
    assert pipe([3], seed=0).speculative is None
