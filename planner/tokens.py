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


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the planner sees before the plan; generation continues with ``<IMG_BEGIN>``."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(prompt=prompt)


def prompt_with_plan_start(tokenizer, prompt: str) -> str:
    """`format_prompt` followed by ``<IMG_BEGIN>``: where plan generation starts."""
    return format_prompt(tokenizer, prompt) + " " + IMG_BEGIN
