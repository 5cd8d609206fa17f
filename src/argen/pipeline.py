"""The user-facing pipeline: a tokenizer + a generator + default sampler settings, loaded from one folder.

    pipe = ARPipeline.from_pretrained("default")            # the model shipped with argen
    images = pipe([3, 7], generator=torch.Generator().manual_seed(0)).images   # PIL images

A pipeline folder holds `tokenizer/` and `generator/` (pretrained folders) and `pipeline.json`
(class names and sampler defaults). The tokenizer decodes what the generator's order samples: ids through a VQ
decoder, or continuous latents (MAR) through a KL decoder, whose scale factor is the one the generator trained at.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from argen.data.images import to_pil, to_uint8
from argen.data.shards import token_values
from argen.models.interface import Condition
from argen.models.packed_linear import pack_linears, unpack_linears
from argen.pretrained import atomic_write, load_pretrained
from argen.sampling.config import SamplerConfig, Speculative
from argen.sampling.decode import check_guide, decode_steps, generate, seeded_generators
from argen.sampling.positions import KnownTokens
from argen.sampling.speculative import SpeculativeStats

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"
# Speculative decoding checks a drafted block per sample: on CPU it paid off at batch 1 and cost 1.6-2.5x the plain
# sampler's time at batch 8 (bench/fast_sampling.py, docs/default-model.md). Above this many images per batch,
# say so rather than run silently slower.
SPECULATIVE_BATCH_LIMIT = 4
# Shipped pipelines by name; "default" is what `argen sample` uses without arguments.
SHIPPED = {
    "default": "raster-mnist",
    "raster": "raster-mnist",
    "raster-mnist": "raster-mnist",
    "next-scale": "next-scale-mnist",
    "next-scale-mnist": "next-scale-mnist",
    "masked": "masked-mnist",
    "masked-mnist": "masked-mnist",
    "random-order": "random-order-mnist",
    "random-order-mnist": "random-order-mnist",
}
if (ASSETS / "mar-mnist").is_dir():  # MAR (continuous tokens): packed by scripts/make_mar.sh
    SHIPPED.update({"mar": "mar-mnist", "mar-mnist": "mar-mnist"})
PIPELINE_NAME = "pipeline.json"


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A shipped name or a folder path -> the folder."""
    if str(name_or_path) in SHIPPED:
        path = ASSETS / SHIPPED[str(name_or_path)]
        if not path.is_dir():
            raise FileNotFoundError(f"the shipped model {name_or_path!r} is missing from {ASSETS} (broken install?)")
        return path
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{name_or_path!r} is neither a shipped model ({sorted(SHIPPED)}) nor a folder")
    return path


@dataclass
class PipelineOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor
    labels: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N, seq_len) ids, or (N, seq_len, D) latents of a continuous order (MAR)
    speculative: SpeculativeStats | None = None  # target passes, drafts and acceptances (speculative sampling)


class ARPipeline:
    def __init__(
        self,
        tokenizer: torch.nn.Module,
        generator: torch.nn.Module,
        class_names: list[str] | None = None,
        sampler: SamplerConfig | None = None,
        draft: torch.nn.Module | None = None,
        guide: torch.nn.Module | None = None,
    ):
        values = token_values(tokenizer)
        if values != generator.order.values:
            raise ValueError(
                f"the tokenizer gives {values} tokens, the {generator.order.name} order models "
                f"{generator.order.values} ones"
            )
        if tokenizer.vocab_size != generator.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary {tokenizer.vocab_size} != generator vocabulary {generator.vocab_size}"
            )
        if tokenizer.seq_len != generator.seq_len:
            raise ValueError(f"tokenizer makes {tokenizer.seq_len} tokens, generator expects {generator.seq_len}")
        if values == "continuous" and tokenizer.token_dim != generator.token_dim:
            raise ValueError(f"tokenizer latents have {tokenizer.token_dim} values, generator {generator.token_dim}")
        if generator.order.reads_tokenizer:  # next-scale generators read their inputs through the tokenizer
            generator.bind(tokenizer)
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        self.class_names = class_names or [str(i) for i in range(generator.num_classes)]
        self.sampler = sampler or SamplerConfig.from_flat(dict(generator.order.default_sampler))
        self.sampler.options_for(generator.order)  # an option this order lacks fails here
        # Optional small generator of the same order, the drafter of speculative="draft".
        self.draft = draft.eval() if draft is not None else None
        # Optional weaker generator of the same order, what autoguidance (guide_scale) contrasts with.
        if guide is not None:
            check_guide(generator, guide)
            if guide.order.reads_tokenizer:
                guide.bind(tokenizer)
        self.guide = guide.eval() if guide is not None else None
        self.compiled = False

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "default",
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | None = None,
    ) -> ARPipeline:
        """Load a pipeline folder (or a shipped name) onto `device`, its weights cast to `torch_dtype` (default:
        as saved, float32). Logits are computed in float32 whatever the weights' dtype."""
        path = resolve(name_or_path)
        meta = json.loads((path / PIPELINE_NAME).read_text()) if (path / PIPELINE_NAME).is_file() else {}
        sampler = SamplerConfig.from_flat(meta.get("sampler", {}))
        tokenizer = load_pretrained(path / "tokenizer")
        generator = load_pretrained(path / "generator")
        draft = load_pretrained(path / "draft") if (path / "draft").is_dir() else None
        guide = load_pretrained(path / "guide") if (path / "guide").is_dir() else None
        return cls(tokenizer, generator, meta.get("class_names"), sampler, draft, guide).to(device, torch_dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ARPipeline:
        """Move (and cast floating weights of) every component: tokenizer, generator, draft and guide models."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"torch_dtype must be a floating dtype (float32, bfloat16, float16), got {dtype}")
        for part in (self.tokenizer, self.generator, self.draft, self.guide):
            if part is not None:
                part.to(device=device, dtype=dtype)
        weight = next(self.generator.parameters())
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not self.compiled:
            # a decode step multiplies a few rows by every weight: prepacked for oneDNN, ~1.3-2x per layer
            for part in (self.generator, self.draft, self.guide):
                if part is not None:
                    pack_linears(part)
        return self

    def compile(self, **options) -> ARPipeline:
        """`torch.compile` what sampling spends its time in, in place: each transformer block of the generator
        (and of the draft and guide models) and the tokenizer's decoder; `options` go to `torch.compile`. The first
        batch of each shape pays the compilation. Meant for CUDA: on this project's CPU it did not pay (GPT-B at batch
        8 in bf16, one thread, beside a training run: 256 decode steps 15.1 s compiled against 13.2 s eager with
        prepacked weights; LlamaGen's VQ decoder 256 s to compile and no faster). oneDNN-prepacked linear weights
        are unpacked first: inductor cannot take them."""
        for part in (self.generator, self.draft, self.guide):
            if part is not None:
                unpack_linears(part)
                for block in part.repeated_blocks():
                    block.compile(**options)
        self.tokenizer.decoder.compile(**options)
        self.compiled = True
        return self

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """`dtype=torch.float16` halves the files (weights are upcast again when loaded)."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / "tokenizer", dtype=dtype)
        self.generator.save_pretrained(directory / "generator", dtype=dtype)
        if self.draft is not None:
            self.draft.save_pretrained(directory / "draft", dtype=dtype)
        if self.guide is not None:
            self.guide.save_pretrained(directory / "guide", dtype=dtype)
        meta = {"class_names": self.class_names, "sampler": self.sampler.flat()}
        atomic_write(directory / PIPELINE_NAME, lambda t: Path(t).write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def label_ids(self, labels: list[int | str] | torch.Tensor) -> torch.Tensor:
        """Class ids or class names -> (N,) ids."""
        if isinstance(labels, torch.Tensor):
            return labels.long().to(self.device)
        ids = []
        for label in labels:
            if isinstance(label, str) and not label.isdigit():
                if label not in self.class_names:
                    raise ValueError(f"unknown class {label!r}; classes: {self.class_names}")
                ids.append(self.class_names.index(label))
            else:
                ids.append(int(label))
        out = torch.tensor(ids, dtype=torch.long, device=self.device)
        if ((out < 0) | (out >= self.generator.num_classes)).any():
            raise ValueError(f"class ids must be in 0..{self.generator.num_classes - 1}, got {ids}")
        return out

    @torch.no_grad()
    def __call__(
        self,
        labels: list[int | str] | torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        batch_size: int = 64,
        output_type: str = "pil",
        progress: bool = False,
        known: KnownTokens | None = None,
        **sampler_overrides,
    ) -> PipelineOutput:
        """Generate one image per label.

        generator: one torch.Generator per image, or a single one from which per-image seeds are drawn;
        seed: image i uses seed + i (so a seed gives the same image whatever the batch size).
        known: tokens to teacher-force instead of sampling (see `edit`).
        sampler_overrides: any flat sampler field (cfg_scale, top_k, speculative, window, prune, ...).
        output_type: "pil", "np" ((N, H, W, C) uint8) or "pt" ((N, C, H, W) in [-1, 1]).
        """
        labels = self.label_ids(labels)
        config = self.config(**sampler_overrides)
        gens = self.generators(len(labels), seed, generator)
        tokens, images = [], []
        speculative = isinstance(config.acceleration, Speculative)
        if speculative and min(batch_size, len(labels)) > SPECULATIVE_BATCH_LIMIT:
            log.warning(
                "speculative decoding at %d images per batch is likely slower than the plain sampler (measured "
                "1.6-2.5x slower at batch 8 on CPU); it pays at batch 1-%d: lower --batch-size, or unset speculative",
                min(batch_size, len(labels)),
                SPECULATIVE_BATCH_LIMIT,
            )
        stats = SpeculativeStats() if speculative else None
        starts = range(0, len(labels), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch")
        for i in starts:
            part = (
                None
                if known is None
                else KnownTokens(known.tokens[i : i + batch_size], known.known[i : i + batch_size])
            )
            ids = generate(
                self.generator,
                Condition.classes(labels[i : i + batch_size]),
                config,
                gens[i : i + batch_size],
                known=part,
                draft_model=self.draft,
                stats=stats,
                codebook=self.codebook if speculative and config.acceleration.relax_k else None,
                guide_model=self.guide,
            )
            tokens.append(ids)
            images.append(self.tokenizer.decode(ids).clamp(-1, 1).float().cpu())
        images = self._format(torch.cat(images), output_type)
        return PipelineOutput(images, labels.cpu(), torch.cat(tokens).cpu(), stats)

    @property
    def codebook(self) -> torch.Tensor:
        """The tokenizer's code vectors (V, d): what relaxed speculative acceptance measures closeness in."""
        return self.tokenizer.quantize.embedding.weight

    @torch.no_grad()
    def edit(
        self,
        images: torch.Tensor,
        keep: torch.Tensor,
        labels: list[int | str] | torch.Tensor,
        seed: int | None = None,
        output_type: str = "pil",
        **sampler_overrides,
    ) -> PipelineOutput:
        """Zero-shot in-/out-painting and class-conditional editing (VAR §4.4): the tokens of the region to keep
        are teacher-forced at every step, the others are generated (with `labels` as the class).

        images: (B, C, H, W) in [-1, 1]; keep: (B, 1, H, W) bool, True where the source stays.
        """
        images = images.to(self.device, next(self.tokenizer.parameters()).dtype)
        if keep.shape != (images.shape[0], 1, *images.shape[-2:]):
            raise ValueError(
                f"keep must be (B, 1, H, W) = {(images.shape[0], 1, *images.shape[-2:])}, got {tuple(keep.shape)}"
            )
        known = KnownTokens(self.tokenizer.encode(images), self.tokenizer.token_mask(keep.to(self.device)))
        return self(labels, seed=seed, output_type=output_type, known=known, **sampler_overrides)

    @torch.no_grad()
    def progressive(
        self, labels: list[int | str] | torch.Tensor, seed: int | None = None, **sampler_overrides
    ) -> Iterator[torch.Tensor]:
        """Yield the decoded images (B, C, H, W) in [-1, 1] after every step: coarse to fine for next-scale
        models (a preview per scale), a partial canvas for orders that fill positions (what is known so far)."""
        labels = self.label_ids(labels)
        config = self.config(**sampler_overrides)
        gens = self.generators(len(labels), seed)
        for step in decode_steps(self.generator, Condition.classes(labels), config, gens, guide_model=self.guide):
            yield self.tokenizer.decode_partial(step.tokens, step.filled).clamp(-1, 1).float().cpu()

    def config(self, **sampler_overrides) -> SamplerConfig:
        """The pipeline's sampler defaults with flat overrides, checked against the generator's order."""
        config = self.sampler.with_overrides(**sampler_overrides)
        config.options_for(self.generator.order)
        return config

    @staticmethod
    def _format(pixels: torch.Tensor, output_type: str):
        if output_type == "pil":
            out = to_pil(pixels)
        elif output_type == "np":
            out = to_uint8(pixels)
        elif output_type == "pt":
            out = pixels
        else:
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        return out

    def generators(
        self, n: int, seed: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> list[torch.Generator]:
        """One generator per image, on the kind of device the model runs on (its draws stay on the device): image
        i of `seed` draws from seed + i, so anything that samples for this pipeline (the server too) reproduces
        its images; a list is taken as given, one generator seeds them all, and with neither the seed is random."""
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images: pass one per image")
            return generator
        if generator is not None:
            seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()
        else:
            base = seed if seed is not None else int(torch.randint(0, 2**31, ()).item())
            seeds = [base + i for i in range(n)]
        return seeded_generators(seeds, device=self.device)
