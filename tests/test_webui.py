"""`plan2img serve` driven through gradio_client on the shipped models: generate, edit the plan and regenerate, a
bad plan's readable error, limits, and 20 requests 4 at a time (none fails; the same seed gives the same image)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from diffusion_backbone.pipeline import TextToImagePipeline  # noqa: E402
from plan2img.cli import _load_base, _load_bridge_pipeline, _load_critic, _load_reviser, build_parser  # noqa: E402
from plan2img.webui import App, Downloads, Limits, Models, serve  # noqa: E402
from planner.schema import Plan  # noqa: E402
from toyworld import vocab as V  # noqa: E402

STEPS = 3  # enough to draw something; the test is about the service, not the images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    port = _free_port()
    args = build_parser().parse_args(["serve", "--port", str(port)])
    models = Models(args, _load_bridge_pipeline, lambda a: TextToImagePipeline(_load_base(a.model)), _load_critic,
                    _load_reviser)  # fmt: skip
    demo = serve(App(models, Limits(images=4, steps=50)), port=port, block=False)
    try:
        yield gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def _pixels(item) -> np.ndarray:
    image = item["image"] if isinstance(item, dict) else item[0]
    path = image["path"] if isinstance(image, dict) else image
    return np.asarray(Image.open(path).convert("RGB"))


def _generate(client, prompt="a red circle", plan="", seed=0, n=1):
    return client.predict(prompt, plan, seed, n, "dpm++2m", STEPS, 7.5, api_name="/generate")


def test_generate_shows_the_plan_and_images_and_offers_downloads(client):
    gallery, plan, png, meta = _generate(client, "two blue squares above a red star", n=2)
    assert len(gallery) == 2 and _pixels(gallery[0]).shape == (256, 256, 3)  # 64 px shown 4x
    assert Plan.parse(plan, V.TOY_PLAN_SPEC).to_text() == plan
    assert Image.open(png).size == (512, 256)
    native = client.predict("two blue squares above a red star", 0, 2, "dpm++2m", STEPS, 7.5, True,
                            api_name="/generate_native")  # fmt: skip
    assert len(native) == 2


def test_an_edited_plan_is_what_gets_drawn(client):
    plan = client.predict("a red circle", api_name="/write_plan")
    edited = plan.replace("red", "green")
    assert edited != plan
    before, _, _, _ = _generate(client, plan=plan)
    after, used, _, _ = _generate(client, plan=edited)
    assert used == edited
    assert not np.array_equal(_pixels(before[0]), _pixels(after[0]))


def test_a_bad_plan_and_numbers_out_of_range_get_readable_errors(client):
    with pytest.raises(gradio_client.exceptions.AppError, match="Plan: "):
        _generate(client, plan="<IMG_BEGIN> <STYLE> nonsense")
    with pytest.raises(gradio_client.exceptions.AppError, match="maximum value 4|Number of images must be 1 to 4"):
        _generate(client, n=5)
    with pytest.raises(gradio_client.exceptions.AppError, match="Prompt: prompt is empty"):
        _generate(client, prompt="   ")
    bad_seed = "less than minimum value 0|Seed must be a whole number"  # gradio's own check, or ours
    with pytest.raises(gradio_client.exceptions.AppError, match=bad_seed):
        _generate(client, seed=-4)


def test_twenty_requests_four_at_a_time_none_fails_and_the_same_seed_gives_the_same_image(client):
    seeds = [k % 5 for k in range(20)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: _generate(client, seed=s), seeds))
    first: dict[int, np.ndarray] = {}
    for s, (gallery, _, png, _) in zip(seeds, results):
        image = _pixels(gallery[0])
        assert png is not None
        if s in first:
            assert np.array_equal(image, first[s])
        first[s] = image
    assert len({first[s].tobytes() for s in first}) == 5  # different seeds, different images


def test_a_queued_job_can_be_cancelled_and_the_queue_goes_on(client):
    jobs = [client.submit("a red circle", "", s, 2, "dpm++2m", 20, 7.5, api_name="/generate") for s in range(3)]
    assert jobs[2].cancel()  # still waiting behind the others on the bridge's queue
    assert len(jobs[0].result()[0]) == 2 and len(jobs[1].result()[0]) == 2
    assert jobs[2].status().code.name in ("CANCELLED", "FINISHED") and jobs[2].status().success is not True


def test_download_folders_are_capped_and_live_under_one_root():
    downloads = Downloads(keep=2)
    folders = [downloads.new() for _ in range(3)]
    assert all(f.parent == downloads.root for f in folders)
    assert not folders[0].exists() and folders[1].is_dir() and folders[2].is_dir()
    with pytest.raises(ValueError, match="keep >= 1"):
        Downloads(keep=0)
