"""`plan2img serve`: a Gradio web UI over the loaded models (the face only: every action calls a library function).

Prompt -> plan (shown, editable) -> images, the bridge and the native base side by side on the same seeds; the
critique-and-refine loop as a strip with each round's critique; PNG and JSON downloads. Safety and load: binds
127.0.0.1 unless told otherwise, limits prompt length, image count and steps with a readable message, one queue per
loaded model (the bridge's U-Net and the native U-Net each serve one request at a time), and a Cancel button that
stops queued and running jobs (generation stops between images).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from llm_bridge.refine import Refiner
from plan2img.cli import _refine_config
from planner.schema import Plan, PlanError
from safeio import InputError, atomic_write_bytes, atomic_write_json
from toyworld.grammar import check_prompt

MAX_PROMPT_CHARS = 500
MAX_IMAGES = 8
MAX_STEPS = 100
MAX_ROUNDS = 8
SAMPLERS = ["dpm++2m", "ddim", "euler-a"]
SHOW_SCALE = 4  # 64 px images are shown 256 px
EXAMPLE = {"prompt": "two blue squares and a red star", "seed": 0, "n": 2, "sampler": "dpm++2m", "steps": 25,
           "guidance": 7.5, "rounds": 4}  # fmt: skip


@dataclass
class Limits:
    prompt_chars: int = MAX_PROMPT_CHARS
    images: int = MAX_IMAGES
    steps: int = MAX_STEPS
    rounds: int = MAX_ROUNDS
    downloads: int = 64  # result folders kept for the download buttons (the oldest is removed first)


class Models:
    """The models the UI serves, loaded once by the CLI's loaders (so ``--bridge``, ``--llm``, ... work as in
    `plan2img generate`); the native pipeline gets its own base, since the bridge patches its U-Net."""

    def __init__(self, args: argparse.Namespace, load_bridge, load_native, load_critic, load_reviser=None):
        self.args = args
        self.bridge = load_bridge(args)
        self.native = load_native(args)
        self._critic = self._reviser = None
        self._load_critic, self._load_reviser = load_critic, load_reviser
        self._critic_lock = threading.Lock()

    @property
    def critic(self):
        with self._critic_lock:  # loaded on the first refine request
            if self._critic is None:
                self._critic = self._load_critic(self.args)
            return self._critic

    @property
    def reviser(self):
        """The plan reviser of the refine loop (None: no ``revise`` move), loaded on the first refine request."""
        with self._critic_lock:
            if self._reviser is None and self._load_reviser is not None:
                self._reviser = self._load_reviser(self.args) or False
            return self._reviser or None


def _big(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).resize((image.shape[1] * SHOW_SCALE, image.shape[0] * SHOW_SCALE), Image.NEAREST)


def _gallery(images: list[np.ndarray], seeds: list[int]) -> list[tuple[Image.Image, str]]:
    return [(_big(im), f"seed {k}") for im, k in zip(images, seeds)]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Downloads:
    """Files behind the download buttons: one folder per result under one temporary root, which is removed when
    the server's process ends; only the newest ``keep`` folders stay, so a long-running server does not fill the
    disk."""

    def __init__(self, keep: int = 64):
        if keep < 1:
            raise ValueError(f"Downloads needs keep >= 1, got {keep}")
        self.keep = keep
        self._root = tempfile.TemporaryDirectory(prefix="plan2img-")
        self._folders: deque[Path] = deque()
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return Path(self._root.name)

    def new(self) -> Path:
        """A fresh folder for one result (removing the oldest beyond ``keep``)."""
        with self._lock:
            folder = Path(tempfile.mkdtemp(dir=self._root.name))
            self._folders.append(folder)
            while len(self._folders) > self.keep:
                shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder


class App:
    """The UI's actions as plain methods (what the Gradio events call; testable without a browser)."""

    def __init__(self, models: Models, limits: Limits | None = None):
        self.models = models
        self.limits = limits or Limits()
        self.downloads = Downloads(self.limits.downloads)

    # ------------------------------------------------------------------------------------------ checks
    def _prompt(self, prompt: str) -> str:
        try:
            text = check_prompt(prompt or "", max_chars=self.limits.prompt_chars)
        except InputError as err:
            raise gr.Error(f"Prompt: {err}") from None
        return text

    def _plan(self, plan: str) -> str | None:
        plan = (plan or "").strip()
        if not plan:
            return None
        try:
            return Plan.parse(plan, self.models.bridge.writer.plan_spec).to_text()
        except PlanError as err:
            raise gr.Error(f"Plan: {err}") from None

    def _seeds(self, seed, n: int) -> list[int]:
        try:
            first = int(seed)
        except (TypeError, ValueError):
            raise gr.Error(f"Seed must be a whole number, got {seed!r}") from None
        if first != seed or not 0 <= first < 2**63 - n:
            raise gr.Error(f"Seed must be a whole number from 0 to 2**63 - {n + 1}, got {seed!r}")
        return [first + k for k in range(n)]

    def _numbers(self, n: int, steps: int, guidance: float, sampler: str) -> tuple[int, int, float]:
        n, steps = int(n), int(steps)
        if not 1 <= n <= self.limits.images:
            raise gr.Error(f"Number of images must be 1 to {self.limits.images}, got {n}")
        if not 1 <= steps <= self.limits.steps:
            raise gr.Error(f"Steps must be 1 to {self.limits.steps}, got {steps}")
        if not (np.isfinite(guidance) and 0 <= guidance <= 30):
            raise gr.Error(f"Guidance must be 0 to 30, got {guidance}")
        if sampler not in SAMPLERS:
            raise gr.Error(f"Sampler must be one of {SAMPLERS}, got {sampler!r}")
        return n, steps, float(guidance)

    def example(self) -> dict:
        """Every output of the sample request (`EXAMPLE`), computed once: the page starts filled in."""
        e = EXAMPLE
        sampling = (e["seed"], e["n"], e["sampler"], e["steps"], e["guidance"])
        bridge, plan, png, js = list(self.generate(e["prompt"], "", *sampling))[-1]
        native = list(self.generate_native(e["prompt"], *sampling))[-1]
        strip, critique, strip_png, strip_json = self.refine(e["prompt"], plan, e["seed"], e["rounds"], e["sampler"],
                                                             e["steps"], e["guidance"])  # fmt: skip
        return {"plan": plan, "bridge": bridge, "native": native, "png": png, "json": js, "strip": strip,
                "critique": critique, "strip_png": strip_png, "strip_json": strip_json}  # fmt: skip

    # ----------------------------------------------------------------------------------------- actions
    def write_plan(self, prompt: str) -> str:
        """The writer's plan for the prompt (shown in the editable plan box)."""
        prompt = self._prompt(prompt)
        result = self.models.bridge.writer.plan([prompt])[0]
        if result.plan is None:
            raise gr.Error(f"The planner wrote no valid plan: {result.error}")
        return result.plan.to_text()

    def generate(self, prompt, plan, seed, n, sampler, steps, guidance):
        """Bridge images from the plan (written from the prompt when the box is empty); yields after each image
        (so Cancel stops between images): (gallery, plan, PNG file, JSON file)."""
        prompt, plan = self._prompt(prompt), self._plan(plan)
        n, steps, guidance = self._numbers(n, steps, guidance, sampler)
        plan = plan or self.write_plan(prompt)
        images, seeds = [], self._seeds(seed, n)
        for s in seeds:
            out = self.models.bridge([prompt], [s], plans=[plan], sampler=sampler, steps=steps,
                                     guidance_scale=guidance)  # fmt: skip
            images.append(out.images[0])
            yield _gallery(images, seeds), plan, None, None
        png, meta = self._save("bridge", images, {"prompt": prompt, "plan": plan, "seeds": seeds, "sampler": sampler,
                                                  "steps": steps, "guidance": guidance})  # fmt: skip
        yield _gallery(images, seeds), plan, png, meta

    def generate_native(self, prompt, seed, n, sampler, steps, guidance):
        """The native base from the prompt alone, on the same seeds (the side-by-side baseline)."""
        prompt = self._prompt(prompt)
        n, steps, guidance = self._numbers(n, steps, guidance, sampler)
        images, seeds = [], self._seeds(seed, n)
        for s in seeds:
            out = self.models.native([prompt], [s], sampler=sampler, steps=steps, guidance_scale=guidance)
            images.append(out.images[0])
            yield _gallery(images, seeds)

    def refine(self, prompt, plan, seed, rounds, sampler, steps, guidance):
        """The critique-and-refine loop: (strip image, critique text per round, PNG file, trajectory JSON)."""
        prompt, plan = self._prompt(prompt), self._plan(plan)
        _, steps, guidance = self._numbers(1, steps, guidance, sampler)
        rounds = int(rounds)
        if not 1 <= rounds <= self.limits.rounds:
            raise gr.Error(f"Rounds must be 1 to {self.limits.rounds}, got {rounds}")
        ns = argparse.Namespace(sampler=sampler, steps=steps, guidance=guidance, moves=None)
        seed = self._seeds(seed, 1)[0]
        refiner = Refiner(self.models.bridge, self.models.critic, _refine_config(ns, rounds), self.models.reviser)
        traj = refiner(prompt, seed, plan)
        lines = [f"plan: {traj.plan}"]
        for r in traj.rounds:
            lines.append(f"round {r.index} ({r.move}, seed {r.seed}): score {r.score:.2f} - "
                         f"{r.note or (r.critique.text if r.critique else '')}")  # fmt: skip
            if r.move == "revise":
                lines.append(f"  revised plan: {r.drawn or r.plan}")
        lines.append(f"best: round {traj.best.index} (score {traj.best.score:.2f})")
        folder = self.downloads.new()
        png, meta = traj.save(folder / "strip.png", scale=SHOW_SCALE)
        return Image.open(png), "\n".join(lines), str(png), str(meta)

    def _save(self, name: str, images: list[np.ndarray], meta: dict) -> tuple[str, str]:
        folder = self.downloads.new()
        sheet = np.concatenate(images, axis=1)
        png = atomic_write_bytes(folder / f"{name}.png", _png_bytes(_big(sheet)))
        js = atomic_write_json(folder / f"{name}.json", meta)
        return str(png), str(js)


def build_ui(app: App, example: bool = False) -> gr.Blocks:
    """The page: controls on the left, bridge and native galleries side by side, the refine strip below. With
    ``example``, the sample prompt's results are computed first and the page starts with them (a demo, a
    screenshot)."""
    lim = app.limits
    ex = app.example() if example else {}
    with gr.Blocks(title="plan2img") as demo:
        gr.Markdown(
            "# plan2img\nA language model writes an image **plan**; the plan's hidden states condition a diffusion "
            "U-Net. Write a prompt, look at (and edit) the plan, then generate. The native base, which reads only "
            "your prompt, runs on the same seeds for comparison.\n\nThe toy planner knows the toy world's wordings "
            "(one or two kinds of shape, counts, left/right/above/below, style, lighting, camera); an unusual wording "
            "can lose an object. Check the plan, edit it, and generate again."
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value=EXAMPLE["prompt"], lines=2,
                                    max_length=lim.prompt_chars)  # fmt: skip
                plan = gr.Textbox(label="Plan (editable; empty: written from the prompt)", lines=4,
                                  value=ex.get("plan", ""))  # fmt: skip
                write = gr.Button("Write plan")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                    n = gr.Slider(1, lim.images, value=EXAMPLE["n"], step=1, label="Images")
                with gr.Accordion("Sampling", open=False):
                    sampler = gr.Dropdown(SAMPLERS, value="dpm++2m", label="Sampler")
                    steps = gr.Slider(1, lim.steps, value=25, step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
                    native_too = gr.Checkbox(value=True, label="Also run the native base (side by side)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    cancel = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                with gr.Row():
                    bridge_out = gr.Gallery(label="plan2img (bridge, reads the plan)", columns=2, height=300,
                                            value=ex.get("bridge"))  # fmt: skip
                    native_out = gr.Gallery(label="native base (reads the prompt)", columns=2, height=300,
                                            value=ex.get("native"))  # fmt: skip
                with gr.Row():
                    png_file = gr.File(label="Download PNG", height=70, value=ex.get("png"))
                    json_file = gr.File(label="Download plan JSON", height=70, value=ex.get("json"))
        with gr.Accordion("Critique and refine", open=True):
            with gr.Row():
                rounds = gr.Slider(1, lim.rounds, value=4, step=1, label="Rounds (diffusion calls at most)")
                refine_go = gr.Button("Refine")
            strip = gr.Image(label="Rounds", show_label=False, type="pil", value=ex.get("strip"))
            critique = gr.Textbox(label="Critiques", lines=6, value=ex.get("critique", ""))
            with gr.Row():
                strip_png = gr.File(label="Download strip PNG", height=70, value=ex.get("strip_png"))
                strip_json = gr.File(label="Download trajectory JSON", height=70, value=ex.get("strip_json"))
        sampling = [seed, n, sampler, steps, guidance]
        write.click(app.write_plan, [prompt], [plan], api_name="write_plan", concurrency_id="bridge",
                    concurrency_limit=1)  # fmt: skip
        gen = go.click(app.generate, [prompt, plan, *sampling], [bridge_out, plan, png_file, json_file],
                       api_name="generate", concurrency_id="bridge", concurrency_limit=1)  # fmt: skip

        def native_if(p, s, k, sa, st, g, on):
            if not on:
                yield []
                return
            yield from app.generate_native(p, s, k, sa, st, g)

        nat = go.click(native_if, [prompt, *sampling, native_too], [native_out], api_name="generate_native",
                       concurrency_id="native", concurrency_limit=1)  # fmt: skip
        ref = refine_go.click(app.refine, [prompt, plan, seed, rounds, sampler, steps, guidance],
                              [strip, critique, strip_png, strip_json], api_name="refine", concurrency_id="bridge",
                              concurrency_limit=1)  # fmt: skip
        cancel.click(None, None, None, cancels=[gen, nat, ref])
    return demo


def serve(app: App, host: str = "127.0.0.1", port: int = 7860, block: bool = True, max_queue: int = 64,
          example: bool = False):  # fmt: skip
    """Launch the UI (one queue per model; at most ``max_queue`` waiting requests). Returns the Blocks."""
    demo = build_ui(app, example)
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=not block)
    return demo
