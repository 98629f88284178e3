"""Train the toy base U-Net from scratch on VAE latents and toy-CLIP text states (resumes). Example:

python scripts/train_base_unet.py --vae runs/vae_f4/final --clip runs/clip/final --out runs/unet --max-steps 6000
"""

from alignment.args import parse_config
from alignment.base.unet import UNetTrainConfig, train_unet

if __name__ == "__main__":
    print(train_unet(parse_config(UNetTrainConfig, description=__doc__)))
