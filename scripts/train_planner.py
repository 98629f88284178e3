"""Train the toy planner LLM from scratch with TRL's SFTTrainer (resumes from OUT/checkpoints). Example:

python scripts/train_planner.py --data data/toy50k --out runs/planner --epochs 2
"""

from alignment.args import parse_config
from alignment.planner_sft import PlannerTrainConfig, train_planner

if __name__ == "__main__":
    print(train_planner(parse_config(PlannerTrainConfig, description=__doc__)))
