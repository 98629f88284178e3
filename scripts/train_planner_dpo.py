"""Planner DPO: TRL's DPOTrainer on plan pairs (prompt / chosen / rejected) through a LoRA adapter on a planner,
the reference by disabled adapters (resumes nothing: runs are short). Example:

python scripts/train_planner_dpo.py --pairs runs/pairs_train/pairs/best-of/plans --out runs/planner_dpo --max-steps 200
plan2img plan "two blue squares and a red star" --adapter runs/planner_dpo/final/adapter
"""

from alignment.args import parse_config
from alignment.planner_dpo import PlannerDPOConfig, train_planner_dpo
from toyworld.vocab import TOY_PLAN_SPEC

if __name__ == "__main__":
    print(train_planner_dpo(parse_config(PlannerDPOConfig, description=__doc__), TOY_PLAN_SPEC))
