"""Train the toy critic (a tiny LLaVA reading images as plans) on a prepared data set's images and plans, with VAE
round trips, blur and noise as augmentation (resumes from OUT/checkpoint). Example:

python scripts/train_critic.py --data data/toy50k --out runs/critic --max-steps 3000 --threads 1
"""

from alignment.args import parse_config
from alignment.critic_training import CriticTrainConfig, train_critic

if __name__ == "__main__":
    train_critic(parse_config(CriticTrainConfig, description=__doc__))
