"""The built-in toy world: scenes, renderer, prompt grammar, canonical plans, ShapesEval, shipped models.

Imports only `planner.schema` (and the leaf `safeio`).
"""
