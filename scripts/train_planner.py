"""Train the toy planner LLM with TRL's SFTTrainer (resumes from OUT/checkpoints). Examples:

python scripts/train_planner.py --data data/toy50k --out runs/planner --epochs 2
python scripts/train_planner.py --data data/toy12k --out runs/planner_wide_lora --init toyworld/pretrained/planner \\
    --data-rows 10000 --wide-rows 28000 --epochs 1 --lr 2e-3 --lora-rank 32

``--wide-rows N`` adds N prompt/plan rows of the toy world's widened grammar (no images).
"""

from alignment.args import parse_config
from alignment.planner_sft import PlannerTrainConfig, train_planner
from toyworld.data import wide_rows

if __name__ == "__main__":
    cfg = parse_config(PlannerTrainConfig, description=__doc__)
    print(train_planner(cfg, wide_rows(cfg.wide_rows, cfg.wide_seed, cfg.augment)))
