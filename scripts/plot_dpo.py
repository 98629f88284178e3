"""Diagnostics of DPO runs as PNG: one column per run, rows for the loss, implicit-reward accuracy, reward margin,
the diffusion loss on held-out images against the frozen reference (drift), and the gradient norm. Reads the
``log.jsonl`` that `plan2img dpo` writes (U-Net LoRA / connector DPO) or that planner DPO's TRL callback writes
(``rewards/accuracies``, ``rewards/margins``). Needs matplotlib (``pip install -e ".[plots]"``).

    python scripts/plot_dpo.py runs/dpo14_unet_b2500 runs/dpo14_collapse --labels healthy collapsed \\
        --out docs/dpo_diagnostics.png
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from safeio import atomic_write_bytes  # noqa: E402

# (panel title, [(key in log.jsonl, legend label)], y-axis reference line or None)
PANELS = [
    ("DPO loss (log 2 = policy equals reference)", [("loss", "train")], 0.6931),
    (
        "implicit-reward accuracy",
        [("implicit_acc", "train"), ("heldout_implicit_acc", "held-out"), ("rewards/accuracies", "train (TRL)")],
        0.5,
    ),  # fmt: skip
    (
        "reward margin",
        [("reward_margin", "train"), ("heldout_reward_margin", "held-out"), ("rewards/margins", "train (TRL)")],
        0.0,
    ),  # fmt: skip
    (
        "held-out diffusion loss (drift)",
        [("heldout_diffusion_loss", "policy"), ("heldout_ref_diffusion_loss", "reference")],
        None,
    ),  # fmt: skip
    ("gradient norm", [("grad_norm", "")], None),
]


def read_log(run: str | Path) -> list[dict]:
    path = Path(run)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"no log at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r]


def plot(runs: list[list[dict]], labels: list[str]):
    panels = [p for p in PANELS if any(k in r for rows in runs for r in rows for k, _ in p[1])]
    fig, axes = plt.subplots(len(panels), len(runs), figsize=(4.2 * len(runs), 2.3 * len(panels)), squeeze=False,
                             sharex="col")  # fmt: skip
    for c, (rows, label) in enumerate(zip(runs, labels)):
        axes[0][c].set_title(label, fontsize=11, fontweight="bold")
        for r, (title, keys, ref) in enumerate(panels):
            ax = axes[r][c]
            for key, name in keys:
                pts = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=name or None)
            if ref is not None:
                ax.axhline(ref, color="grey", lw=0.8, ls="--")
            ax.set_ylabel(title, fontsize=8)
            ax.tick_params(labelsize=7)
            if any(name for key, name in keys if any(key in row for row in rows)):
                ax.legend(fontsize=7)
        axes[-1][c].set_xlabel("step", fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="DPO run folders (or their log.jsonl files)")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"{len(args.runs)} runs but {len(labels)} labels")
    fig = plot([read_log(r) for r in args.runs], labels)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
