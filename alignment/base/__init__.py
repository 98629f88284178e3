"""Training of the toy world's frozen base: VAE, CLIP and the text-conditioned U-Net."""
