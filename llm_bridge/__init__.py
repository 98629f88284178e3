"""The LLM bridge: plan hidden states -> connector -> U-Net conditioning, and `Plan2ImgPipeline`.

Imports planner and diffusion_backbone. (Filled in by the bridge work.)
"""
