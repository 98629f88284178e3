"""Everything that trains: stage configs A/B/C, losses, LoRA, EMA, checkpoints, preference data, refine loop.

Imports planner, diffusion_backbone and llm_bridge. (Filled in by the training work.)
"""
