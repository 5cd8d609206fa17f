"""`argen train-tokenizer`, `tokenize`, `train`, `train-classifier`: the training commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from argen.cli.common import load_tokenizer, nonnegative_int, parse_overrides, positive_int, run_folder
from argen.errors import ConfigError
from argen.pretrained import config_from_dict

log = logging.getLogger("argen")


def _model_config(presets: dict, name: str, derived: list[str], overrides: list[str]):
    """The preset `name` with fields derived from the data (`derived`), then the user's --set `overrides`."""
    if name not in presets:
        raise ConfigError(f"--preset {name!r} is unknown; choose from {sorted(presets)}")
    base = dataclasses.asdict(presets[name])
    try:
        fields = {**base, **parse_overrides(derived), **parse_overrides(overrides)}
        return config_from_dict(type(presets[name]), fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{'--set' if overrides else f'--preset {name}'}: {e}") from e


def add_train_args(p: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    from argen.train.loop import TrainConfig

    d = TrainConfig()
    p.add_argument(
        "--out", type=run_folder, required=True, help="run folder: checkpoints, previews, log.jsonl, final/"
    )
    p.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps in all")
    p.add_argument(
        "--stop-after",
        type=nonnegative_int,
        default=d.stop_after,
        help="end after this many steps, the lr schedule still spanning --steps (a run cut to a time budget; "
        "--resume continues it); 0 runs all",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help="global batch size (all ranks together)"
    )
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps to the peak lr")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables EMA")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation and data order")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    p.add_argument(
        "--keep-checkpoints",
        type=nonnegative_int,
        default=d.keep_checkpoints,
        help="newest checkpoints kept on disk; 0 keeps all (to pick one by FD afterwards)",
    )
    p.add_argument("--preview-every", type=int, default=d.preview_every, help="steps between preview images")
    p.add_argument("--num-workers", type=nonnegative_int, default=d.num_workers, help="data loader processes")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest complete checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in --out (deletes its checkpoints)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=d.precision, help="fp16 adds loss scaling")
    p.add_argument(
        "--parallel",
        choices=["ddp", "fsdp"],
        default=d.parallel,
        help="under torchrun: DDP replicas, or FSDP2 shards per block with sharded checkpoints",
    )
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in backward (less memory)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the model preset, e.g. --set dim=64 (repeatable; default: none)",
    )


def _train_config(args: argparse.Namespace):
    from argen.train.loop import TrainConfig

    return TrainConfig(
        steps=args.steps,
        stop_after=args.stop_after,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        seed=args.seed,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        preview_every=args.preview_every,
        num_workers=args.num_workers,
        parallel=args.parallel,
        precision=args.precision,
        grad_accum=args.grad_accum,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
    )


def tokenizer_presets() -> dict:
    from argen.tokenizers.registry import presets

    return presets()


def generator_presets() -> dict:
    """Every order's presets, from the one registry of orders: preset name -> config."""
    from argen.models.registry import presets

    return {name: config for name, (_, config) in presets().items()}


def generator_preset_help() -> str:
    from argen.models.registry import ORDERS

    orders = [
        f"{order} ({', '.join(table)}{'; needs --tokenizer' if cls.order.reads_tokenizer else ''})"
        for order, (cls, table) in ORDERS.items()
    ]
    return f"generator order and size: {', '.join(orders)}; change single fields with --set"


def _tokenizer_task(config, preview: torch.Tensor, restart_every: int):
    """A tokenizer config -> the training task of the tokenizer it configures: codebook ids train with the VQ
    objective (dead codes restarted), continuous latents with reconstruction + KL (nothing to restart)."""
    from argen.tokenizers.registry import build
    from argen.train.tasks import AutoencoderTask, TokenizerTask

    model = build(config)
    if model.values == "continuous":
        return AutoencoderTask(model, preview)
    return TokenizerTask(model, preview, restart_every)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from argen.data.datasets import load_dataset
    from argen.train.distributed import setup
    from argen.train.loop import train

    setup(args.device)  # under torchrun, join the ranks before the data: an image folder is read once, by rank 0
    config = _model_config(tokenizer_presets(), args.preset, [], args.overrides)
    dataset = load_dataset(args.data, config.image_size, config.image_channels)
    torch.manual_seed(args.seed)
    preview = torch.stack([dataset[int(i)][0] for i in np.linspace(0, len(dataset) - 1, min(16, len(dataset)))])
    result = train(
        _tokenizer_task(config, preview, args.restart_every),
        dataset,
        _train_config(args),
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
    )
    if result.output:
        print(f"tokenizer saved to {result.output} (loss {result.final_loss:.4f}, {result.seconds:.0f} s)")


def cmd_tokenize(args: argparse.Namespace) -> None:
    """Under torchrun each rank encodes a share of every shard's batches and rank 0 writes the shards: the same
    files as one process."""
    from argen.data.datasets import load_dataset
    from argen.data.shards import write_shards
    from argen.train.distributed import cleanup, setup

    info = setup(args.device)  # before the data: an image folder is read once, by rank 0
    try:
        tokenizer = load_tokenizer(args.tokenizer).to(info.device)
        dataset = load_dataset(args.data, tokenizer.config.image_size, tokenizer.config.image_channels)
        out = write_shards(
            tokenizer,
            dataset,
            args.out,
            batch_size=args.batch_size,
            hflip=args.hflip,
            dist_info=info,
            per_channel=args.normalize == "channel",
        )
    finally:
        cleanup(info)
    if info.is_main:
        print(f"wrote token shards to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from argen.data.shards import TokenShards
    from argen.models.registry import model_class, presets
    from argen.pipeline import ARPipeline
    from argen.pretrained import load_pretrained
    from argen.train.loop import train
    from argen.train.tasks import GeneratorTask

    shards = TokenShards(args.tokens)
    if args.preset not in presets():
        raise ConfigError(f"--preset {args.preset!r} is unknown; choose from {sorted(presets())}")
    order = presets()[args.preset][0]
    model_cls = model_class(order)
    shards.check_order(model_cls.order)  # ids for a discrete order, latents for a continuous one
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    overrides = [f"vocab_size={shards.vocab_size}"] if shards.values == "discrete" else []
    if shards.class_names:
        overrides.append(f"num_classes={len(shards.class_names)}")
    # --init's kind first: a generator of another order would otherwise fail on what its data lacks for this one
    init = _load_init(args.init, model_cls) if args.init else None
    fields = model_cls.config_class.data_fields(shards.seq_len, tokenizer)  # what the data fixes (grid, scales)
    overrides += [f"{k}={json.dumps(v)}" for k, v in fields.items()]
    # Fine-tuning keeps the initial generator's architecture: its config stands in for the preset's.
    presets_now = {args.preset: init.config} if init is not None else generator_presets()
    config = _model_config(presets_now, args.preset, overrides, args.overrides)
    torch.manual_seed(args.seed)
    model = model_cls(config)
    if args.reinit and init is None:
        raise ConfigError("--reinit needs --init: it names the modules of the --init generator that start fresh")
    if init is not None:
        _copy_weights(init, model, args.init, args.reinit)
    if shards.values == "continuous":
        _match_latents(model, shards, tokenizer)
    if model_cls.order.reads_tokenizer:
        model.bind(tokenizer)
    task = GeneratorTask(model, tokenizer=tokenizer)
    result = train(
        task, shards, _train_config(args), args.out, resume=args.resume, overwrite=args.overwrite, device=args.device
    )
    if result.output:
        print(f"generator saved to {result.output} (loss {result.final_loss:.4f}, {result.seconds:.0f} s)")
        if tokenizer is not None:
            # No sampler given: the pipeline takes the order's documented defaults (OrderSpec.default_sampler),
            # the guidance the shipped model of that order uses, not "guidance off".
            pipe = ARPipeline(tokenizer, load_pretrained(result.output), shards.class_names or None)
            print(
                f"pipeline saved to {pipe.save_pretrained(Path(args.out) / 'pipeline')} with the "
                f"{pipe.generator.order.name} order's default guidance: cfg {pipe.sampler.cfg_scale} "
                f"({pipe.sampler.cfg_schedule} schedule); argen sample --cfg overrides it"
            )


def _load_init(path: str, model_cls):
    """The generator `--init` names, which must be of the preset's order (the loader checks the kind)."""
    from argen.errors import WrongComponentError
    from argen.pretrained import load_pretrained

    try:
        return load_pretrained(path, expected_type=model_cls)
    except WrongComponentError as e:
        raise ConfigError(f"--init {path}: {e}, which --preset trains ({model_cls.order.name} order)") from e


def _copy_weights(init, model, path: str, reinit: list[str] = ()) -> None:
    """Load `init`'s weights into `model` (built from the same config up to --set fields such as dropout, which
    hold no weights); a shape change (a --set of dim, depth, vocab, a different grid) is refused by name, except in
    the `reinit` modules, which keep `model`'s fresh initialisation whatever their shape."""
    from argen.errors import CheckpointError
    from argen.pretrained import load_state_dict_strict

    def fresh(name: str, modules=reinit) -> bool:
        return any(name == m or name.startswith(m + ".") for m in modules)

    own = model.state_dict()
    for m in reinit:
        if not any(fresh(name, [m]) for name in own):
            raise ConfigError(f"--reinit {m}: the generator has no module or parameter of that name")
    weights = {k: v for k, v in init.state_dict().items() if not fresh(k)}
    weights.update({k: v for k, v in own.items() if fresh(k)})
    try:
        load_state_dict_strict(model, weights, source=f"--init {path}")
    except CheckpointError as e:  # the strict loader names missing, unexpected and mis-shaped tensors
        raise ConfigError(
            f"--init {path} does not fit the generator being trained (the data or --set changed its shape): {e}"
        ) from e
    log.info("initialised from %s (fine-tuning%s)", path, f"; fresh: {', '.join(reinit)}" if reinit else "")


def _match_latents(model, shards, tokenizer) -> None:
    """A continuous order on latent shards: the model's tokens must be the shards' (one per latent position), and
    the tokenizer decodes them with the scale factor (and per-channel shift) measured when they were written."""
    if (model.seq_len, model.token_dim) != (shards.seq_len, shards.token_dim):
        raise ConfigError(
            f"the model takes {model.seq_len} tokens of {model.token_dim} values, the shards hold {shards.seq_len} "
            f"of {shards.token_dim} (one per latent position): drop --set patch_size"
        )
    tokenizer.config = dataclasses.replace(
        tokenizer.config, scale_factor=shards.scale_factor, latent_shift=shards.latent_shift
    )


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from argen.data.datasets import ArrayDataset, load_dataset
    from argen.eval.classifier import ClassifierConfig, ImageClassifier, accuracy
    from argen.pretrained import load_pretrained
    from argen.train.distributed import setup
    from argen.train.loop import train
    from argen.train.tasks import ClassifierTask

    setup(args.device)  # under torchrun, join the ranks before the data: an image folder is read once, by rank 0
    config = ClassifierConfig(image_size=args.image_size, image_channels=args.channels)
    data = load_dataset(args.data, config.image_size, config.image_channels)
    held = ArrayDataset.of(load_dataset(args.eval_data, config.image_size, config.image_channels))
    config = dataclasses.replace(config, num_classes=len(data.class_names))
    torch.manual_seed(args.seed)
    result = train(
        ClassifierTask(ImageClassifier(config)),
        data,
        _train_config(args),
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
    )
    if result.output:
        acc = accuracy(load_pretrained(result.output), held.images, held.labels)
        print(
            f"classifier saved to {result.output}: accuracy {acc:.4f} on {len(held)} held-out images "
            f"({args.eval_data})"
        )
