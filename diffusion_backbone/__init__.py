"""The frozen latent-diffusion side: conditioning, VAE/U-Net/scheduler loading, text encoders, samplers.

Imports none of plan2img's other packages. (Filled in by the base-models work.)
"""
