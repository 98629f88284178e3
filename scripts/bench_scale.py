"""Full-size cost on CPU, as ratios measured in one run: random weights in the real full configs (an SD1.5 U-Net
and VAE at 256x256, a ~0.5B Llama), each measurement in a fresh process so its peak memory is its own.

- train: one stage-A step of the bridge (`BridgeTrainModule`: connector trained, U-Net frozen, cached LLM states)
  against a plain diffusers fine-tune step of the same U-Net (all U-Net weights trained, AdamW);
- generate: one image, 25 DPM-Solver++ steps, guidance 7.5, our chain without planning (LLM forward over a plan,
  connector, our sampler with the bridge attached, VAE decode) against a stock `StableDiffusionPipeline` with the
  same U-Net and VAE fed `prompt_embeds`.

    python scripts/bench_scale.py --out runs/bench_scale.json [--repeats 2] [--threads 2]

Prints a table and writes JSON (seconds are the median of ``--repeats`` after one warm-up; memory is peak RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.bridge_training import BridgeTrainModule
from alignment.losses import ClipAlignmentHead
from alignment.stages import StageConfig
from diffusion_backbone.sampling import decode_latents, sample
from llm_bridge.bridge import LLMBridge
from llm_bridge.connector import ConnectorConfig
from llm_bridge.encoder import PlanStates
from safeio import atomic_write_json

SIDE, LATENT, TEXT_LEN, D_TEXT = 256, 32, 77, 768
PLAN_TOKENS = 60


def sd15_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=LATENT, cross_attention_dim=D_TEXT, attention_head_dim=8)


def sd15_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    blocks = ("DownEncoderBlock2D",) * 4
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=blocks,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                         sample_size=SIDE)  # fmt: skip


def llama_half_b() -> LlamaForCausalLM:
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def bridge_for(unet, d_llm: int) -> LLMBridge:
    ccfg = ConnectorConfig.from_preset("resampler-64q", d_llm=d_llm, d_ctx=D_TEXT, d_time=None, layers="last")
    bridge = LLMBridge(ccfg, torch.zeros(TEXT_LEN, D_TEXT), torch.ones(TEXT_LEN, dtype=torch.bool))
    bridge.attach(unet)
    return bridge


def plan_states(batch: int, d: int) -> PlanStates:
    g = torch.Generator().manual_seed(3)
    fields = torch.arange(PLAN_TOKENS).remainder(8).expand(batch, -1)
    mask = torch.ones(batch, PLAN_TOKENS, dtype=torch.bool)
    objects = torch.zeros(batch, PLAN_TOKENS, dtype=torch.long)
    return PlanStates(torch.randn(batch, PLAN_TOKENS, d, generator=g), mask, fields, objects)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def part_train_stock(repeats: int) -> dict:
    unet, sched = sd15_unet().train(), scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(4)
    z0, ctx = torch.randn(1, 4, LATENT, LATENT, generator=g), torch.randn(1, TEXT_LEN, D_TEXT, generator=g)

    def step():
        noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (1,), generator=g)
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=ctx).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step_s": _timed(step, repeats)}


def part_train_ours(repeats: int) -> dict:
    unet, d = sd15_unet(), 1536
    unet.requires_grad_(False).eval()
    bridge = bridge_for(unet, d)
    head = ClipAlignmentHead(d, 768)
    encoder = type("NoLLM", (), {"model": torch.nn.Linear(1, 1)})()  # states are cached: the LLM never runs
    module = BridgeTrainModule(bridge, head, encoder, unet, scheduler())
    params = [p for p in list(bridge.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    stage = StageConfig("A", train=["connector"], clip_align_weight=0.1)
    g = torch.Generator().manual_seed(4)
    states, z0 = plan_states(1, d), torch.randn(1, 4, LATENT, LATENT, generator=g)
    clip_image = torch.randn(1, 768, generator=g)

    def step():
        noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (1,), generator=g)
        losses = module(None, None, states, z0, clip_image, None, None, torch.zeros(1, dtype=torch.bool), t, noise,
                        stage)  # fmt: skip
        losses["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step_s": _timed(step, repeats)}


def part_generate_stock(repeats: int) -> dict:
    pipe = StableDiffusionPipeline(vae=sd15_vae(), text_encoder=None, tokenizer=None, unet=sd15_unet(),
                                   scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    emb, neg = torch.randn(1, TEXT_LEN, D_TEXT, generator=g), torch.randn(1, TEXT_LEN, D_TEXT, generator=g)

    def run():
        pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=25, guidance_scale=7.5,
             height=SIDE, width=SIDE, generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip

    return {"total_s": _timed(run, repeats)}


def part_generate_ours(repeats: int) -> dict:
    unet, vae, llm = sd15_unet().eval(), sd15_vae().eval(), llama_half_b()
    bridge = bridge_for(unet, llm.config.hidden_size).eval()
    ids = torch.randint(0, 32000, (1, PLAN_TOKENS + 20), generator=torch.Generator().manual_seed(6))
    null = bridge.null_conditioning(1)
    split: dict[str, list[float]] = {"llm_forward_s": [], "connector_s": [], "denoise_s": [], "decode_s": []}

    @torch.no_grad()
    def run():
        t0 = time.perf_counter()
        hidden = llm(ids, output_hidden_states=True).hidden_states[-1][:, -PLAN_TOKENS:]
        t1 = time.perf_counter()
        base = plan_states(1, llm.config.hidden_size)
        cond = bridge.conditioning(PlanStates(hidden, base.mask, base.field_ids, base.object_ids))
        t2 = time.perf_counter()
        latents = sample(unet, scheduler(), cond, null, num_inference_steps=25, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
        t3 = time.perf_counter()
        decode_latents(vae, latents)
        t4 = time.perf_counter()
        for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            split[k].append(v)

    total = _timed(run, repeats)
    return {"total_s": total, **{k: sorted(v[1:])[len(v[1:]) // 2] for k, v in split.items()}}


PARTS = {
    "train_stock": part_train_stock,
    "train_ours": part_train_ours,
    "generate_stock": part_generate_stock,
    "generate_ours": part_generate_ours,
}


def _child(part: str, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    result = PARTS[part](repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_scale.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # internal: one measurement
    args = ap.parse_args()
    if args.part:
        return _child(args.part, args.repeats, args.threads)
    results = {}
    for part in PARTS:
        cmd = [
            sys.executable,
            __file__,
            "--part",
            part,
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            raise RuntimeError(f"{part} failed:\n{done.stderr[-3000:]}")
        results[part] = json.loads(lines[-1][len("RESULT ") :])
        print(part, results[part], flush=True)
    go, gs = results["generate_ours"], results["generate_stock"]
    tr, ts = results["train_ours"], results["train_stock"]
    ratios = {
        "train_step_ours_over_stock": results["train_ours"]["step_s"] / results["train_stock"]["step_s"],
        "generate_ours_over_stock": results["generate_ours"]["total_s"] / results["generate_stock"]["total_s"],
        "denoise_decode_ours_over_stock": (
            results["generate_ours"]["denoise_s"] + results["generate_ours"]["decode_s"]
        )
        / results["generate_stock"]["total_s"],
    }
    atomic_write_json(args.out, {"threads": args.threads, "repeats": args.repeats, "results": results, **ratios})
    print("\n| measurement | ours | stock diffusers | ratio | peak RSS ours / stock (MB) |\n|---|---|---|---|---|")
    print(f"| stage-A step vs fine-tune step (s) | {tr['step_s']:.2f} | {ts['step_s']:.2f} | "
          f"{ratios['train_step_ours_over_stock']:.2f} | "
          f"{tr['peak_rss_mb']:.0f} / {ts['peak_rss_mb']:.0f} |")  # fmt: skip
    print(f"| one image, 25 steps (s) | {go['total_s']:.2f} | {gs['total_s']:.2f} | "
          f"{ratios['generate_ours_over_stock']:.2f} | "
          f"{go['peak_rss_mb']:.0f} / {gs['peak_rss_mb']:.0f} |")  # fmt: skip
    print(f"\nours split: LLM {go['llm_forward_s']:.2f} s, connector {go['connector_s']:.3f} s, denoise "
          f"{go['denoise_s']:.2f} s, decode {go['decode_s']:.2f} s; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
