"""plan2img: LLM-planned image generation. This package is the command-line face only (`plan2img`)."""

__version__ = "0.1.0"
