"""The `plan2img` command line: argument parsing only; every command calls a library function."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from safeio import InputError

# ------------------------------------------------------------------------------------------- option types
MAX_IMAGES = 64  # --n, per command: more is a job for `plan2img eval` or a script
MAX_STEPS = 1000


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]; anything else is a usage error (exit 2) naming the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
        return value

    return parse


def _float_in(lo: float, hi: float):
    """An argparse type: a finite number in [lo, hi] (NaN and inf are refused, not sampled with)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be a finite number in [{lo:g}, {hi:g}], got {text}")
        return value

    return parse


SEED = _int_in(0, 2**63 - 1)


# ------------------------------------------------------------------------------------------- loaders
def _pretrained(name: str, given: str | None) -> Path:
    from toyworld.pretrained import pretrained_path

    return Path(given) if given else pretrained_path(name)


def _device(args) -> str:
    """``--device`` checked before any model is loaded: a name torch knows, and CUDA / MPS present when asked for."""
    import torch

    name = getattr(args, "device", None) or "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"--device {name!r} is not a device torch knows ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available on this machine")
    return name


def _load_base(model: str | None, device: str = "cpu"):
    from diffusion_backbone.models import load_backbone

    return load_backbone(_pretrained("base", model), device=device)


def _toy_spec(args):
    from planner.schema import PlanSpec
    from toyworld.vocab import TOY_PLAN_SPEC

    return PlanSpec() if getattr(args, "free_plan", False) else TOY_PLAN_SPEC


def _check_plan_option(args) -> None:
    """A ``--plan`` given by the user parses under the plan spec in use, before any model is loaded."""
    from planner.schema import Plan, PlanError

    if getattr(args, "plan", None) is None:
        return
    try:
        Plan.parse(args.plan, _toy_spec(args))
    except PlanError as err:
        raise err.with_context("--plan") from None


def _load_planner(args):
    from planner.planner import Planner

    return Planner.from_pretrained(
        _pretrained("planner", args.llm),
        **_llm_kwargs(args),
        adapter=getattr(args, "adapter", None),
        few_shot=getattr(args, "few_shot", False),
    )


def _llm_kwargs(args) -> dict:
    """`Planner.from_pretrained` options every LLM of a command shares (reader, writer, reviser)."""
    # an 8-bit LLM without --device keeps bitsandbytes' own placement (its GPU), as before --device existed
    keep = args.load_in_8bit and getattr(args, "device", None) is None
    return dict(
        load_in_8bit=args.load_in_8bit,
        device=None if keep else _device(args),
        spec=_toy_spec(args),
        trust_remote_code=args.trust_remote_code,
    )


def _spatial_settings(args) -> dict:
    """Spatial-injection overrides from the command line (only those given)."""
    settings = {}
    if getattr(args, "spatial", None) is not None:
        settings["spatial"] = args.spatial == "on"
    for name in ("region_strength", "region_levels", "object_tokens", "object_queries"):
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    return settings


def _writer_source(args) -> str | None:
    """The folder `_load_writer` loads the writer from, or None where the reader writes its own plans."""
    from planner.planner import is_adapter_dir
    from toyworld.pretrained import PRETRAINED_DIR

    writer = getattr(args, "writer", None)
    if writer == "same":
        return None
    if writer is None:
        shipped = PRETRAINED_DIR / "planner_wide"
        if args.llm or getattr(args, "adapter", None) or not is_adapter_dir(shipped):
            return None
        writer = str(shipped)
    return writer


def _load_writer(args):
    """The planner that writes the plans: ``--writer`` (a planner folder, or a LoRA adapter folder over the
    ``--llm`` planner), else the shipped widened-grammar adapter over the shipped planner (unless ``--llm`` or
    ``--adapter`` is given), else the reader."""
    from planner.planner import load_planner

    writer = _writer_source(args)
    if writer is None:
        return None
    return load_planner(writer, base=_pretrained("planner", args.llm), **_llm_kwargs(args))


def _load_reviser(args):
    """The planner LLM that revises plans in the refine loop (``revise``): ``--reviser`` (a planner folder, or a
    LoRA adapter trained on the writer, merged over it); None without ``--reviser`` (no toy reviser is shipped: the
    trained ones made the loop worse, docs/results.md) or with ``--reviser none``."""
    from planner.planner import Planner, is_adapter_dir
    from planner.reviser import PlanReviser, reviser_stack

    given, writer = getattr(args, "reviser", None), _writer_source(args)
    if given in (None, "none"):
        return None
    kwargs = _llm_kwargs(args)
    if not is_adapter_dir(given):
        return PlanReviser(Planner.from_pretrained(given, **kwargs))
    base, adapters = reviser_stack(writer, given, _pretrained("planner", args.llm))
    return PlanReviser(Planner.from_pretrained(base, adapter=adapters, **kwargs))


def _reading(args) -> dict:
    """What the bridge / native + layout read besides the plan (``--reads``): the plan's caption or the prompt."""
    from toyworld.grammar import plan_caption, reading_order_plan

    if getattr(args, "reads", "plan") == "prompt":
        return {}
    return {"caption": plan_caption, "normalize_plan": reading_order_plan}


def _load_bridge_pipeline(args):
    from llm_bridge.bridge import LLMBridge
    from llm_bridge.pipeline import Plan2ImgPipeline

    pipe = Plan2ImgPipeline(
        _load_planner(args),
        LLMBridge.from_pretrained(_pretrained("bridge", args.bridge)).to(_device(args)),
        _load_base(args.model, _device(args)),
        writer=_load_writer(args),
        **_reading(args),
    )
    settings = _spatial_settings(args)
    if settings:
        pipe.set_spatial(**settings)
    if getattr(args, "unet_dpo", None):
        from alignment.dpo import load_unet_dpo

        load_unet_dpo(pipe.backbone.unet, args.unet_dpo)
    return pipe


def _load_native_layout(args, regions: bool = True):
    from llm_bridge.native_layout import NativeLayoutPipeline

    planner = None if args.plan_source == "oracle" else (_load_writer(args) or _load_planner(args))
    levels = None if args.region_levels is None else tuple(args.region_levels)
    strength = 1.0 if args.region_strength is None else args.region_strength
    caption = _reading(args).get("caption")
    return NativeLayoutPipeline(
        planner,
        _load_base(args.model, _device(args)),
        strength=strength,
        levels=levels,
        regions=regions,
        caption=caption,
    )


def _load_critic(args):
    from planner.critic import PlanReader

    return PlanReader.from_pretrained(
        _pretrained("critic", getattr(args, "critic", None)), spec=_toy_spec(args), device=_device(args)
    )


def _refine_config(args, rounds: int):
    from llm_bridge.refine import RefineConfig

    moves = tuple(m.strip() for m in args.moves.split(",")) if getattr(args, "moves", None) else None
    kwargs = {} if moves is None else {"moves": moves}
    if getattr(args, "revise_reference", None):
        kwargs["revise_reference"] = args.revise_reference
    return RefineConfig(rounds=rounds, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, **kwargs)


def _critic_generator(args, generate, pipe, pairs):
    """Wrap a ShapesEval generator in best-of-K (``--best-of``) or the refine loop (``--refine``): same seeds,
    at most K diffusion calls per image; every candidate set also yields a preference pair for ``pairs``."""
    import numpy as np

    from llm_bridge.refine import Refiner, best_of
    from toyworld.eval.runner import judge_candidates

    critic = _load_critic(args)
    writer = pipe.writer if pipe is not None else (_load_writer(args) or _load_planner(args))
    grammar = writer.plan_spec.object_grammar

    def intended(prompts, entries):
        if args.plan_source == "oracle":
            return [e["plan"] for e in entries]
        return [r.plan.to_text() for r in writer.plan(prompts)]

    if args.refine:
        refiner = Refiner(pipe, critic, _refine_config(args, args.refine), reviser=_load_reviser(args))

        def refined(prompts, entries, seeds):
            out = []
            for prompt, plan, seed in zip(prompts, intended(prompts, entries), seeds):
                traj = refiner(prompt, seed, plan)
                pairs.add_ranked(prompt, [r.image for r in traj.rounds], [r.score for r in traj.rounds])
                if plan_pair := traj.plan_pair():
                    pairs.add_plans(prompt, *plan_pair)
                out.append(traj.best.image)
            return np.stack(out)

        return refined

    def chosen(prompts, entries, seeds):
        plans = intended(prompts, entries)
        k = args.best_of
        by_prompt = {p: e for p, e in zip(prompts, entries)}

        def gen(ps, ss):
            return generate(ps, [by_prompt[p] for p in ps], ss)

        pick = None
        if args.pick == "oracle":  # the detector picks: an upper bound, never a result

            def pick(candidates, i):
                return judge_candidates(entries[i], candidates)

        res = best_of(gen, critic, prompts, plans, seeds, k, grammar, pick)
        for prompt, cands, crits in zip(prompts, res.candidates, res.critiques):
            if crits and all(c is not None for c in crits):
                pairs.add_ranked(prompt, cands, [c.score for c in crits])
        return res.images

    return chosen


def _plan_body(plan: str) -> str:
    """A plan without its begin/end markers, for captions."""
    return plan.replace("<IMG_BEGIN>", "").replace("<IMG_END>", "").strip()


def _save_images(images, out: str, scale: int = 1, captions: list[str] | None = None) -> None:
    """The images side by side, each enlarged ``scale`` times (nearest neighbour); with ``captions``, a captioned
    sheet instead (`toyworld.data.preview_grid`, up to 4 per row)."""
    import io

    import numpy as np
    from PIL import Image

    from safeio import atomic_write_bytes

    if captions is not None:
        from toyworld.data import preview_grid  # only the captioned sheet needs it

        sheet = preview_grid(list(images), captions, columns=min(4, len(images)), scale=scale, max_lines=12)
    else:
        images = np.asarray(images).repeat(scale, axis=1).repeat(scale, axis=2)
        sheet = Image.fromarray(images[0] if len(images) == 1 else np.concatenate(list(images), axis=1))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


# ------------------------------------------------------------------------------------------- commands
def _cmd_data_build(args: argparse.Namespace) -> int:
    from toyworld.data import build_dataset

    stats = build_dataset(
        args.out, n=args.n, seed=args.seed, workers=args.workers, heldout_fraction=args.heldout_fraction
    )
    print(json.dumps(stats, indent=2))
    print(f"wrote data set of {args.n} examples to {args.out}")
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from toyworld.data import preview

    print(f"wrote {preview(args.out, data=args.data, n=args.n, seed=args.seed, columns=args.columns)}")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from alignment.prepared import folder_fingerprint, prepare_dataset

    planner, key = None, None
    if args.plan_column is None:
        planner = _load_writer(args) or _load_planner(args)
        # every folder that shapes the plans: the LLM, its --adapter, the writer (default: the shipped one)
        sources = [_pretrained("planner", args.llm), args.adapter, _writer_source(args)]
        key = folder_fingerprint(*[p for p in sources if p]) + ("-fewshot" if args.few_shot else "")
    out = prepare_dataset(
        args.source,
        args.out,
        image_column=args.image_column,
        caption_column=args.caption_column,
        plan_column=args.plan_column,
        resolution=args.resolution,
        center_crop=args.center_crop,
        heldout_fraction=args.heldout_fraction,
        planner=planner,
        planner_key=key,
        spec=_toy_spec(args),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    print(f"wrote prepared data set to {out}")
    return 0


def _cmd_metadata(args: argparse.Namespace) -> int:
    from toyworld.eval.metadata import make_metadata, write_metadata

    if args.wide and args.split != "train":
        raise InputError("--wide draws from the widened training grammar: use it with --split train")
    entries = make_metadata(split=args.split, seed=args.seed, wide=args.wide)
    print(f"wrote {len(entries)} prompts to {write_metadata(entries, args.out)}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import torch

    planner = _load_writer(args) or _load_planner(args)
    gen = torch.Generator().manual_seed(args.seed) if args.sample else None
    results = planner.plan(args.prompts, constrained=not args.unconstrained, do_sample=args.sample, generator=gen)
    failed = 0
    for r in results:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": r.prompt,
                        "plan": r.plan.to_text() if r.plan else None,
                        "fields": r.plan.fields() if r.plan else None,
                        "raw": r.text,
                        "stop_reason": r.stop_reason,
                        "fixes": r.fixes,
                        "error": r.error,
                        "warnings": r.warnings,
                    }
                )
            )
        elif r.plan is None:
            print(f"error: {r.error}", file=sys.stderr)
        else:
            print(r.plan.to_text())
            for note in r.fixes + r.warnings:
                print(f"  note: {note}", file=sys.stderr)
        failed += r.plan is None
    return 1 if failed else 0


def _cmd_generate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from toyworld.grammar import check_prompt

    prompt = check_prompt(args.prompt)
    _check_plan_option(args)
    seeds = [args.seed + k for k in range(args.n)]
    kwargs = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, progress=True)
    if args.native:
        from diffusion_backbone.pipeline import TextToImagePipeline

        out = TextToImagePipeline(_load_base(args.model, _device(args)))([prompt] * args.n, seeds, **kwargs)
    else:
        pipe = _load_bridge_pipeline(args)
        plans = [args.plan] * args.n if args.plan else None
        out = pipe([prompt] * args.n, seeds, plans=plans, use_planner=not args.no_planner, **kwargs)
        if out.plan_texts is not None:
            print(f"plan: {out.plan_texts[0]}")
            if out.read[0] != prompt:
                print(f"reads: {out.read[0]}")
    captions = None
    if args.grid:
        plans = getattr(out, "plan_texts", None) or [None] * args.n
        captions = [f"seed {s}: {prompt}" + (f" | plan: {_plan_body(p)}" if p else "") for s, p in zip(seeds, plans)]
    _save_images(out.images, args.output, args.scale or (4 if args.grid else 1), captions)
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items())
    print(f"wrote {args.output} ({args.n} image(s); {timings}; {time.perf_counter() - t0:.2f}s since start)")
    return 0


def _eval_generator(args: argparse.Namespace, metadata: Path):
    """(image generator, report title, the bridge pipeline or None) for ``plan2img eval`` without ``--images``."""
    sampling = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    settings = f"({args.sampler}, {args.steps} steps, guidance {args.guidance})"
    if args.ground_truth:
        from toyworld.eval.runner import ground_truth_generator

        transform = None
        if args.degrade == "vae":
            from diffusion_backbone.sampling import decode_latents, encode_images

            vae = _load_base(args.model).vae

            def transform(images):
                return decode_latents(vae, encode_images(vae, images))

        generate = ground_truth_generator("none" if args.degrade == "vae" else args.degrade, transform)
        return generate, f"ShapesEval ground truth (degrade={args.degrade}, {metadata.name})", None
    if args.generate == "native":
        from diffusion_backbone.pipeline import TextToImagePipeline

        generate = TextToImagePipeline(_load_base(args.model, _device(args))).as_generator(**sampling)
        return generate, f"ShapesEval native {settings}", None
    if args.generate in ("native-layout", "native-plan"):
        pipe = _load_native_layout(args, regions=args.generate == "native-layout")
        what = "native + layout" if args.generate == "native-layout" else "native on the plan's caption"
        title = f"ShapesEval {what}, reads {args.reads}, plans: {args.plan_source} {settings}"
        return pipe.as_generator(plan_source=args.plan_source, **sampling), title, None
    pipe = _load_bridge_pipeline(args)
    title = f"ShapesEval bridge, reads {args.reads}, plans: {args.plan_source} {settings}"
    return pipe.as_generator(plan_source=args.plan_source, **sampling), title, pipe


def _cmd_eval(args: argparse.Namespace) -> int:
    from toyworld.eval.metadata import limit_per_task, read_metadata
    from toyworld.eval.runner import PACKAGE_METADATA, score_folder, score_generator, write_report
    from toyworld.eval.scoring import summary_table

    metadata = Path(args.metadata) if args.metadata else PACKAGE_METADATA[args.split]
    entries = limit_per_task(read_metadata(metadata), args.limit_per_task)
    if sum([bool(args.images), args.ground_truth, bool(args.generate)]) != 1:
        raise InputError("pass exactly one of --images DIR, --ground-truth, --generate native|bridge")
    if args.best_of and args.refine:
        raise InputError("choose one of --best-of K and --refine K")
    if args.refine and args.generate != "bridge":
        raise InputError("--refine runs the bridge's refine loop: use it with --generate bridge")
    extra = {"metadata": str(metadata)}
    images = pairs = None
    if args.images:
        results = score_folder(entries, args.images)
        title = f"ShapesEval: {args.images}"
    else:
        generate, title, pipe = _eval_generator(args, metadata)
        if args.best_of or args.refine:
            from alignment.preference import PairWriter

            pairs = PairWriter()
            generate = _critic_generator(args, generate, pipe, pairs)
            title += f", refine@{args.refine}" if args.refine else f", best-of-{args.best_of} ({args.pick} picks)"
            extra.update(best_of=args.best_of, refine=args.refine, pick=args.pick)
        extra.update(
            spatial=_spatial_settings(args),
            generator=args.generate or "ground-truth",
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            plan_source=args.plan_source,
            reads=args.reads,
            writer=args.writer,
            # what else shaped the images, so a report names its models
            **{k: getattr(args, k, None) for k in ("llm", "adapter", "bridge", "model", "unet_dpo")},
            device=_device(args),
        )
        results, images = score_generator(
            entries,
            generate,
            n_per_prompt=args.n_per_prompt,
            seed=args.seed,
            batch_size=args.batch_size,
            keep_images=args.save_images,
        )
    if pairs is not None and args.pairs_out:
        counts = pairs.save(args.pairs_out)
        print(f"wrote {counts['images']} image pair(s) to {args.pairs_out}/images")
    summary = write_report(args.out, entries, results, title, images=images, extra=extra)
    print(summary_table(summary, title))
    print(f"wrote {args.out}/results.jsonl, summary.json, summary.md")
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    from llm_bridge.refine import Refiner
    from toyworld.grammar import check_prompt

    prompt = check_prompt(args.prompt)
    _check_plan_option(args)
    config = _refine_config(args, args.rounds)  # bad moves are reported before any model is loaded
    refiner = Refiner(_load_bridge_pipeline(args), _load_critic(args), config, reviser=_load_reviser(args))
    traj = refiner(prompt, args.seed, args.plan)
    print(f"plan: {traj.plan}")
    for r in traj.rounds:
        t = ", ".join(f"{k} {v:.2f}s" for k, v in r.timings.items())
        print(f"round {r.index}: {r.move} seed {r.seed}, score {r.score:.2f} ({t}) - {r.note or r.critique.text}")
        if r.move == "revise":
            print(f"  revised plan: {r.drawn or r.plan}")
    png, meta = traj.save(args.output, scale=args.scale)
    if args.pairs_out:
        from alignment.preference import PairWriter

        pairs = PairWriter()
        pairs.add_ranked(prompt, [r.image for r in traj.rounds], [r.score for r in traj.rounds])
        if plan_pair := traj.plan_pair():
            pairs.add_plans(prompt, *plan_pair)
        pairs.save(args.pairs_out)
    print(f"best: round {traj.best.index} (score {traj.best.score:.2f}); {traj.cost:.2f} diffusion calls; "
          f"wrote {png} and {meta}")  # fmt: skip
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from plan2img.webui import App, Limits, Models, serve
    except ImportError as err:
        raise InputError(f"plan2img serve needs Gradio ({err}): pip install 'plan2img[serve]'") from None
    from diffusion_backbone.pipeline import TextToImagePipeline

    def native(a):
        return TextToImagePipeline(_load_base(a.model, _device(a)))

    models = Models(args, _load_bridge_pipeline, native, _load_critic, _load_reviser)
    limits = Limits(images=args.max_images, steps=args.max_steps)
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve(App(models, limits), host=args.host, port=args.port, example=args.example)
    return 0


def _set_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE ...`` as a dict (values read as YAML)."""
    import yaml

    overrides = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def _resolve_shipped(cfg, keys: tuple[str, ...]) -> None:
    """Shipped models named as in the repository (``toyworld/pretrained/NAME``) work from any directory."""
    for key in keys:
        given = getattr(cfg, key)
        parts = Path(given).parts if given else ()
        if given and not Path(given).exists() and parts[:2] == ("toyworld", "pretrained") and len(parts) == 3:
            setattr(cfg, key, str(_pretrained(parts[2], None)))


def _cmd_train(args: argparse.Namespace) -> int:
    from alignment.bridge_training import train_bridge
    from alignment.stages import load_config

    cfg = load_config(args.config, _set_overrides(args.set))
    _resolve_shipped(cfg, ("base", "planner"))
    for folder in train_bridge(cfg):
        print(f"exported {folder}")
    return 0


def _cmd_dpo(args: argparse.Namespace) -> int:
    from alignment.dpo import ConnectorConditioning, FixedConditioning, load_dpo_config, train_dpo

    cfg = load_dpo_config(args.config, _set_overrides(args.set))
    _resolve_shipped(cfg, ("base", "bridge", "planner", "writer"))
    if cfg.bridge is None:
        backbone = _load_base(cfg.base)

        def source(captions):
            return FixedConditioning.of(backbone.text_encoder.encode, captions)

    else:
        ns = argparse.Namespace(llm=cfg.planner, bridge=cfg.bridge, model=cfg.base, writer=cfg.writer or "same",
                                load_in_8bit=False, trust_remote_code=False, reads="plan")  # fmt: skip
        pipe = _load_bridge_pipeline(ns)
        backbone = pipe.backbone
        if pipe.bridge.connector.timestep_aware:
            raise InputError(f"bridge {cfg.bridge} is timestep-aware: DPO on it is not supported yet")

        def plans_for(captions):
            return [r.plan.to_text() for r in pipe.writer.plan(captions)]

        def source(captions):
            if cfg.target == "unet_lora":
                return FixedConditioning.of(lambda caps: pipe.conditioning_for(caps, plans_for(caps))[0], captions)
            return ConnectorConditioning.of(pipe, captions, plans_for(captions))

    folder = train_dpo(cfg, backbone.unet, backbone.vae, backbone.training_scheduler(), source)
    print(f"exported {folder}")
    return 0


def _cmd_dpo_soup(args: argparse.Namespace) -> int:
    from alignment.dpo import soup_unet_dpo

    folder = soup_unet_dpo(args.folders, args.out, args.weights)
    print(f"wrote {folder} (the mean of {len(args.folders)} DPO LoRAs; merge it with --unet-dpo {folder})")
    return 0


# ------------------------------------------------------------------------------------------- parser
def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["ddim", "euler-a", "dpm++2m"], default="ddim")
    p.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=25)
    p.add_argument("--guidance", type=_float_in(0.0, 100.0), default=5.0, help="classifier-free guidance scale")


def _add_spatial_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("spatial injection (default: as the bridge was trained)")
    g.add_argument("--spatial", choices=["on", "off"], default=None, help="confine object tokens to plan regions")
    g.add_argument(
        "--region-strength", type=_float_in(0.0, 1.0), default=None, help="1: no attention outside a region; 0: none"
    )
    g.add_argument(
        "--region-levels",
        type=int,
        nargs="+",
        default=None,
        help="U-Net maps with regions, as latent side / 2**level (default: every cross-attention layer)",
    )
    g.add_argument("--object-tokens", choices=["span", "shared"], default=None, help="what object groups read")
    g.add_argument("--object-queries", type=_int_in(1, 64), default=None, help="resampler queries per object group")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model folder (default: the shipped toy base)")
    p.add_argument("--llm", default=None, help="planner LLM folder, any local HF causal LM (default: shipped toy)")
    p.add_argument("--bridge", default=None, help="bridge folder (default: the shipped toy bridge)")
    p.add_argument("--unet-dpo", default=None, help="a DPO LoRA folder (plan2img dpo) merged into the U-Net")
    p.add_argument(
        "--adapter",
        default=None,
        help="a LoRA adapter folder over --llm (scripts/train_planner.py --lora-rank), merged into the planner LLM",
    )
    p.add_argument(
        "--few-shot", action="store_true", help="worked example plans before each request (an untrained instruct LM)"
    )
    p.add_argument(
        "--writer",
        default=None,
        help="the planner that writes the plans (--llm still reads them): a planner folder or a LoRA adapter over "
        "--llm; 'same': --llm writes too (default: the shipped widened-grammar adapter with the shipped planner)",
    )
    p.add_argument(
        "--reads",
        choices=["plan", "prompt"],
        default="plan",
        help="plan: the LLM and the native encoder read the plan's caption, so only the plan reaches the U-Net; "
        "prompt: they read your prompt before the plan (the behaviour up to v0.1)",
    )
    p.add_argument("--load-in-8bit", action="store_true", help="load the LLM in 8-bit (bitsandbytes)")
    p.add_argument(
        "--device",
        default=None,
        help="where every model runs: cpu (default; an 8-bit LLM then goes where bitsandbytes puts it), cuda, "
        "cuda:N or mps; the noise is drawn on the CPU from the seeds, so a seed starts from the same noise anywhere",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the LLM folder's own code (off: safer)")
    p.add_argument("--free-plan", action="store_true", help="free-text plan fields instead of the toy vocabulary")


MOVES_HELP = (
    "refine moves, comma-separated, of local,sdedit,reseed,revise,emphasis (default: local,sdedit,reseed,revise; "
    "revise runs only with a reviser)"
)
REVISER_HELP = (
    "plan reviser for the revise move: a planner folder or a LoRA adapter over the writer (default: none, no "
    "revise move)"
)


REVISE_REFERENCE_HELP = (
    "after a revision, score rounds against the original plan (default: the revision is a generation control) or "
    "the revised one"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plan2img", description="LLM-planned image generation (toy world built in).")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or preview toy-world data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="render a data set to disk (Hugging Face datasets format)")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--n", type=_int_in(1, 10_000_000), default=50_000, help="number of examples")
    build.add_argument("--seed", type=SEED, default=0)
    build.add_argument("--workers", type=_int_in(1, 1024), default=None, help="processes (default: CPU count)")
    build.add_argument(
        "--heldout-fraction",
        type=_float_in(0.0, 1.0),
        default=0.1,
        help="share of rows worded by held-out template families",
    )
    build.set_defaults(func=_cmd_data_build)
    prev = data_sub.add_parser("preview", help="write a captioned grid of examples")
    prev.add_argument("--out", required=True, help="output PNG")
    prev.add_argument("--data", default=None, help="data set folder (default: sample fresh examples)")
    prev.add_argument("--n", type=_int_in(1, 1024), default=16)
    prev.add_argument("--seed", type=SEED, default=0)
    prev.add_argument("--columns", type=_int_in(1, 64), default=4)
    prev.set_defaults(func=_cmd_data_preview)
    prep = data_sub.add_parser(
        "prepare", help="your own images and captions -> the prepared training format (plans written if absent)"
    )
    prep.add_argument("source", help="a Parquet file, a `datasets` folder, or an image folder with metadata.jsonl")
    prep.add_argument("--out", required=True, help="output folder (written atomically)")
    prep.add_argument("--image-column", default="image")
    prep.add_argument("--caption-column", default="text")
    prep.add_argument("--plan-column", default=None, help="plans given in the data (default: the planner writes them)")
    prep.add_argument("--resolution", type=_int_in(8, 4096), default=64, help="square side in pixels")
    prep.add_argument("--center-crop", action="store_true", help="centre crop (default: a seeded random crop)")
    prep.add_argument(
        "--heldout-fraction", type=_float_in(0.0, 1.0), default=0.0, help="share of rows marked split=heldout"
    )
    prep.add_argument("--batch-size", type=_int_in(1, 4096), default=64, help="captions per planning batch")
    prep.add_argument("--seed", type=SEED, default=0)
    _add_model_args(prep)
    prep.set_defaults(func=_cmd_data_prepare)

    meta = sub.add_parser("metadata", help="write ShapesEval evaluation_metadata.jsonl")
    meta.add_argument("--out", required=True)
    meta.add_argument(
        "--split",
        choices=["heldout", "train"],
        default="heldout",
        help="template families the prompts are worded with",
    )
    meta.add_argument("--seed", type=SEED, default=0)
    meta.add_argument("--wide", action="store_true", help="also word prompts with the widened training grammar")
    meta.set_defaults(func=_cmd_metadata)

    plan = sub.add_parser("plan", help="prompt -> image plan (the planner LLM)")
    plan.add_argument("prompts", nargs="+")
    plan.add_argument("--json", action="store_true", help="one JSON object per prompt")
    plan.add_argument("--unconstrained", action="store_true", help="no constrained decoding (output is repaired)")
    plan.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    plan.add_argument("--seed", type=SEED, default=0)
    _add_model_args(plan)
    plan.set_defaults(func=_cmd_plan)

    gen = sub.add_parser("generate", help="prompt -> plan -> image (or --native: CLIP text -> image)")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG (several images side by side)")
    gen.add_argument("--native", action="store_true", help="native baseline: CLIP text -> frozen U-Net")
    gen.add_argument("--plan", default=None, help="use this plan text instead of planning")
    gen.add_argument("--no-planner", action="store_true", help="condition on the LLM's states of the raw prompt")
    gen.add_argument("--scale", type=_int_in(1, 16), default=None,
                     help="enlarge each image N times (nearest neighbour; default 1, 4 with --grid)")  # fmt: skip
    gen.add_argument("--grid", action="store_true", help="a captioned sheet: prompt, plan and seed under each image")
    gen.add_argument("--n", type=_int_in(1, MAX_IMAGES), default=1, help="images (seeds seed .. seed + n - 1)")
    gen.add_argument("--seed", type=SEED, default=0)
    _add_sampling_args(gen)
    _add_model_args(gen)
    _add_spatial_args(gen)
    gen.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("eval", help="score images with ShapesEval")
    ev.add_argument("--metadata", default=None, help="metadata JSONL (default: the shipped file of --split)")
    ev.add_argument(
        "--split",
        choices=["heldout", "train"],
        default="heldout",
        help="which shipped metadata to use when --metadata is not given",
    )
    ev.add_argument("--images", default=None, help="GenEval-layout folder DIR/<index>/samples/<k>.png")
    ev.add_argument("--ground-truth", action="store_true", help="render and score the metadata's own scenes")
    ev.add_argument(
        "--degrade",
        choices=["none", "blur-noise", "vae"],
        default="none",
        help="degradation of ground-truth renders (vae: a round trip through the base model's VAE)",
    )
    ev.add_argument(
        "--generate",
        choices=["native", "native-layout", "native-plan", "bridge"],
        default=None,
        help="generate with this pipeline (native-layout: CLIP text + per-object sub-prompts in the plan's regions; "
        "native-plan: CLIP text of the plan's caption, the planner as a prompt rewriter)",
    )
    ev.add_argument(
        "--plan-source",
        choices=["planner", "oracle", "none"],
        default="planner",
        help="bridge: plans from the planner, the metadata's canonical plan, or none (raw prompt)",
    )
    ev.add_argument("--n-per-prompt", type=_int_in(1, MAX_IMAGES), default=4, help="images per prompt when generating")
    ev.add_argument("--seed", type=SEED, default=0)
    ev.add_argument(
        "--limit-per-task", type=_int_in(1), default=None, help="use only the first N prompts of each task"
    )
    ev.add_argument("--save-images", action="store_true", help="also write generated images to OUT/images")
    ev.add_argument("--batch-size", type=_int_in(1, 4096), default=32, help="images per generation batch")
    ev.add_argument("--out", required=True, help="output folder for results.jsonl and summary.json")
    g = ev.add_argument_group("looking at the images (the critic; at most K diffusion calls per image)")
    g.add_argument(
        "--best-of", type=_int_in(1, 9), default=None, metavar="K", help="K seeds per image, the best one kept"
    )
    g.add_argument(
        "--refine", type=_int_in(1, 16), default=None, metavar="K", help="the refine loop with K diffusion calls"
    )
    g.add_argument("--pick", choices=["critic", "oracle"], default="critic",
                   help="who picks the best of K (oracle: the ShapesEval detector, an upper bound only)")  # fmt: skip
    g.add_argument("--moves", default=None, help=MOVES_HELP)
    g.add_argument("--critic", default=None, help="critic folder (default: the shipped toy critic)")
    g.add_argument("--reviser", default=None, help=REVISER_HELP)
    g.add_argument("--revise-reference", choices=["original", "revised"], default=None, help=REVISE_REFERENCE_HELP)
    g.add_argument("--pairs-out", default=None, help="write the critic-ranked preference pairs here")
    _add_sampling_args(ev)
    _add_model_args(ev)
    _add_spatial_args(ev)
    ev.set_defaults(func=_cmd_eval)

    ref = sub.add_parser("refine", help="prompt -> plan -> image -> critique -> edit ..., the best image kept")
    ref.add_argument("prompt")
    ref.add_argument("-o", "--output", default="strip.png", help="the strip PNG (and .json beside it)")
    ref.add_argument("--rounds", type=_int_in(1, 16), default=4, help="at most this many rounds (and diffusion calls)")
    ref.add_argument("--moves", default=None, help=MOVES_HELP)
    ref.add_argument("--reviser", default=None, help=REVISER_HELP)
    ref.add_argument("--revise-reference", choices=["original", "revised"], default=None, help=REVISE_REFERENCE_HELP)
    ref.add_argument("--plan", default=None, help="use this plan text instead of planning")
    ref.add_argument("--seed", type=SEED, default=0)
    ref.add_argument("--scale", type=_int_in(1, 16), default=4, help="upscaling of the images in the strip")
    ref.add_argument("--critic", default=None, help="critic folder (default: the shipped toy critic)")
    ref.add_argument("--pairs-out", default=None, help="write the critic-ranked preference pair here")
    _add_sampling_args(ref)
    _add_model_args(ref)
    _add_spatial_args(ref)
    ref.set_defaults(func=_cmd_refine)

    srv = sub.add_parser("serve", help="a web UI (Gradio) on the loaded models: prompt, plan, images, refine")
    _add_model_args(srv)
    _add_spatial_args(srv)
    srv.add_argument("--critic", default=None, help="critic folder for refine (default: the shipped toy critic)")
    srv.add_argument("--reviser", default=None, help=REVISER_HELP)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    srv.add_argument("--port", type=_int_in(1, 65535), default=7860)
    srv.add_argument("--max-images", type=_int_in(1, 64), default=8, help="images per request, at most")
    srv.add_argument("--max-steps", type=_int_in(1, MAX_STEPS), default=100, help="sampling steps, at most")
    srv.add_argument("--example", action="store_true", help="start with the sample prompt generated and refined")
    srv.set_defaults(func=_cmd_serve)
    train = sub.add_parser("train", help="train the LLM bridge with a staged curriculum (YAML config)")
    train.add_argument("--config", required=True, help="e.g. configs/toy_A.yaml")
    train.add_argument("--set", nargs="*", default=[], help="top-level overrides KEY=VALUE (YAML values)")
    train.set_defaults(func=_cmd_train)
    dpo = sub.add_parser("dpo", help="Diffusion-DPO of a U-Net LoRA on image pairs (stage D; YAML config)")
    dpo.add_argument("--config", required=True, help="e.g. configs/toy_dpo.yaml")
    dpo.add_argument("--set", nargs="*", default=[], help="top-level overrides KEY=VALUE (YAML values)")
    dpo.set_defaults(func=_cmd_dpo)
    soup = sub.add_parser("dpo-soup", help="average several DPO LoRAs of one U-Net into one folder (a model soup)")
    soup.add_argument("folders", nargs="+", help="DPO folders (plan2img dpo's final/), at least two")
    soup.add_argument("--out", required=True, help="the folder to write")
    soup.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per folder (default: mean)")
    soup.set_defaults(func=_cmd_dpo_soup)
    return parser


QUANTIZING_COMMANDS = ("train", "dpo")  # their configs may ask for 8-bit (llm_load_in_8bit, adamw8bit)


def _hide_bitsandbytes_unless_asked(args: argparse.Namespace) -> None:
    """Without --load-in-8bit (or a config that may quantize), mark bitsandbytes absent for this process. diffusers,
    peft and transformers import it whenever it is installed (about a second of start-up, plus its kernel-hub
    warning on every command); with ``sys.modules[name] = None`` their availability checks
    (`importlib.util.find_spec`) say it is not installed, so none of them loads it."""
    if getattr(args, "load_in_8bit", False) or getattr(args, "command", None) in QUANTIZING_COMMANDS:
        return
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # the `plan2img` process itself (a library caller's process is not ours to change)
        _hide_bitsandbytes_unless_asked(args)
    try:
        return args.func(args)
    except InputError as err:  # bad input: one line naming it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be read or written: missing, a folder, no permission, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    # anything else is a bug: Python prints its traceback and exits 1
