"""Profile one training step of the toy U-Net (s/step at a batch size) to size a training run.

python scripts/profile_unet.py --batch-size 64 --block-out-channels 64 128 192
"""

import argparse
import json
import time

import torch

from diffusion_backbone.toy import toy_unet

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-out-channels", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--attention-head-dim", type=int, default=32)
    p.add_argument("--cross-attention-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="autocast to bf16 (slower for this U-Net on CPU)")
    args = p.parse_args()
    unet = toy_unet(args.cross_attention_dim, 16, tuple(args.block_out_channels), args.attention_head_dim)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    b = args.batch_size
    z, ctx = torch.randn(b, 4, 16, 16), torch.randn(b, args.tokens, args.cross_attention_dim)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = unet(z, torch.randint(0, 1000, (b,)), encoder_hidden_states=ctx).sample.float()
        loss = out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"params_M": params / 1e6, "batch_size": b, "sec_per_step": sum(times) / len(times)}))
