"""Everything that trains: the one training loop, stage configs A/B/C, losses (diffusion, CLIP alignment,
Diffusion-DPO), caches, preference data, critic training.

Imports planner, diffusion_backbone and llm_bridge. ``alignment.load_preference_pairs`` is resolved on first use
(PEP 562), so ``import alignment`` stays cheap.
"""

__all__ = ["load_preference_pairs"]


def __getattr__(name: str):
    if name == "load_preference_pairs":
        from alignment.preference import load_preference_pairs

        return load_preference_pairs
    raise AttributeError(f"module 'alignment' has no attribute {name!r}")
