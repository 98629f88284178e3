"""The planner: the plan schema and planning tokens (`planner.schema`) and the LLM that writes plans."""

from planner.schema import (
    FIELD_TAGS,
    FIELDS,
    IMG_BEGIN,
    IMG_END,
    PLANNING_TOKENS,
    ObjectGrammar,
    Plan,
    PlanError,
    PlanObject,
    PlanSpec,
    RepairResult,
    repair_plan,
)

__all__ = [
    "FIELDS",
    "FIELD_TAGS",
    "IMG_BEGIN",
    "IMG_END",
    "PLANNING_TOKENS",
    "ObjectGrammar",
    "Plan",
    "PlanError",
    "PlanObject",
    "PlanSpec",
    "RepairResult",
    "repair_plan",
]
