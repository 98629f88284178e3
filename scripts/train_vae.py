"""Train the toy VAE from scratch (resumes from OUT/checkpoint). Example:

python scripts/train_vae.py --data data/toy50k --out runs/vae --max-steps 7000
"""

from alignment.args import parse_config
from alignment.base.vae import VAETrainConfig, train_vae

if __name__ == "__main__":
    train_vae(parse_config(VAETrainConfig, description=__doc__))
