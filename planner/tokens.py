"""Planning tokens in any Hugging Face tokenizer and model, and the one prompt format.

`add_planning_tokens` appends ``<IMG_BEGIN> <STYLE> ... <IMG_END>`` as special tokens (existing ids never
change) and grows the model's embeddings, initialising the new rows to the mean of the existing ones (so
the new tokens start as an "average" token rather than noise). `format_prompt` is the only place the
prompt wording lives: the tokenizer's chat template when it has one, a plain template otherwise.
"""

from __future__ import annotations

import torch

from planner.schema import IMG_BEGIN, PLANNING_TOKENS

SYSTEM_PROMPT = (
    "You are an image planner. Rewrite the user's request as an image plan between <IMG_BEGIN> and <IMG_END> "
    "with the fields STYLE, LAYOUT, OBJECT (one per kind of object), COLOR, MATERIAL, LIGHTING, CAMERA."
)
PLAIN_TEMPLATE = "Request: {prompt}\nPlan:"
# Worked examples for an instruct LM used without planner training (`format_prompt(..., few_shot=True)`): each a
# request and the plan it should produce, in the default (free) vocabulary.
FEW_SHOT_EXAMPLES = (
    (
        "a red circle on the left",
        "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 1 object, left <OBJECT> 1 medium red circle at left "
        "<COLOR> red <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>",
    ),
    (
        "two small blue squares above a big yellow star, in dim light",
        "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 3 objects, stacked "
        "<OBJECT> 2 small blue square at top left, top right <OBJECT> 1 large yellow star at bottom "
        "<COLOR> blue, yellow <MATERIAL> solid <LIGHTING> dim light <CAMERA> medium shot <IMG_END>",
    ),
)


def add_planning_tokens(tokenizer, model=None) -> dict[str, int]:
    """Add the planning tokens as special tokens (if missing) and resize ``model``; returns token -> id."""
    from tokenizers import AddedToken

    missing = [t for t in PLANNING_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        # lstrip: the space before a tag belongs to the tag, so "text <TAG>" needs no token for the space
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False, lstrip=True) for t in missing], special_tokens=True
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PLANNING_TOKENS}
    if model is not None:
        resize_with_mean_init(model, len(tokenizer))
    return ids


@torch.no_grad()
def resize_with_mean_init(model, new_size: int) -> None:
    """Grow input (and untied output) embeddings to ``new_size``; new rows = mean of the old rows."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if new_size <= old:
        return
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    model.resize_token_embeddings(new_size, mean_resizing=False)
    emb = model.get_input_embeddings()
    emb.weight[old:] = emb.weight[:old].float().mean(0).to(emb.weight.dtype)
    out = model.get_output_embeddings()
    if out is not None and not tied and out.weight.shape[0] == new_size:
        out.weight[old:] = out.weight[:old].float().mean(0).to(out.weight.dtype)
        if getattr(out, "bias", None) is not None:
            out.bias[old:] = out.bias[:old].mean()


def format_prompt(tokenizer, prompt: str, few_shot: bool = False) -> str:
    """The text the planner sees before the plan; generation continues with ``<IMG_BEGIN>``. ``few_shot`` puts
    `FEW_SHOT_EXAMPLES` before the request (as earlier chat turns, or earlier request/plan pairs)."""
    examples = FEW_SHOT_EXAMPLES if few_shot else ()
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for request, plan in examples:
            messages += [{"role": "user", "content": request}, {"role": "assistant", "content": plan}]
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shots = "".join(PLAIN_TEMPLATE.format(prompt=request) + " " + plan + "\n\n" for request, plan in examples)
    return shots + PLAIN_TEMPLATE.format(prompt=prompt)


def prompt_with_plan_start(tokenizer, prompt: str) -> str:
    """`format_prompt` followed by ``<IMG_BEGIN>``: where plan generation starts."""
    return format_prompt(tokenizer, prompt) + " " + IMG_BEGIN
