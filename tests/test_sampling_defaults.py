"""One source of sampling defaults (pipeline.models.sampling_defaults): the model folder's declaration,
else the family's published values; a given value wins; every stage resolves the same; a T2Q whose
scored set was drawn by another sampler is refused where it would be deployed."""
import json
from types import SimpleNamespace

import pytest
from diffusers import EulerDiscreteScheduler

from pipeline.models import REFERENCE_UNET_CONFIGS, load_pipeline, sampling_defaults, tiny_pipeline
from pipeline.qlip.pipeline import check_deployed_sampler
from pipeline.qlip.scoring import check_same_sampler, scored_sampler


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """The seeded tiny SD pipeline saved as a diffusers folder, without any sampling declaration."""
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    tiny_pipeline(0).save_pretrained(path, safe_serialization=True)
    return path


def test_a_folder_without_declarations_gets_the_family_defaults(sd_folder):
    pipe = load_pipeline(str(sd_folder))
    s = sampling_defaults(pipe)
    # SD 1.x/2.x: 50 steps at 7.5; the side is sample_size x the VAE's factor (16 x 2 here; 64 x 8 = 512 for SD 1.4)
    assert (s.steps, s.guidance, s.resolution, s.scheduler) == (50, 7.5, 32, "ddim")
    assert s.origin["steps"] == s.origin["guidance"] == "sd family default"
    sdxl = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(**REFERENCE_UNET_CONFIGS["sdxl-base"])),
                           vae_scale_factor=8, config={}, scheduler=EulerDiscreteScheduler())
    x = sampling_defaults(sdxl)
    assert (x.steps, x.guidance, x.resolution, x.scheduler) == (50, 5.0, 1024, "euler")


def test_the_world_declares_20_steps_at_5_and_overrides_win(sd_folder, tmp_path):
    world = sampling_defaults(load_pipeline("embedded"))
    assert (world.steps, world.guidance, world.resolution, world.scheduler) == (20, 5.0, 32, "ddim")
    assert world.origin["steps"].endswith("world.json")
    given = sampling_defaults(load_pipeline("embedded", scheduler="euler"), steps=7, guidance=2.5, resolution=64)
    assert (given.steps, given.guidance, given.resolution, given.scheduler) == (7, 2.5, 64, "euler")
    (sd_folder / "sampling.json").write_text(json.dumps({"num_inference_steps": 30, "guidance_scale": 6.0}))
    try:
        declared = sampling_defaults(load_pipeline(str(sd_folder)))
        assert (declared.steps, declared.guidance, declared.resolution) == (30, 6.0, 32)
        assert sampling_defaults(load_pipeline(str(sd_folder)), guidance=1.0).guidance == 1.0
    finally:
        (sd_folder / "sampling.json").unlink()
    with pytest.raises(ValueError, match="--resolution 33 .* multiple of the VAE's scale factor 2"):
        sampling_defaults(load_pipeline("tiny-random"), resolution=33)


def test_score_and_generate_resolve_the_same_sampler(tmp_path, monkeypatch):
    """Both stages left at their defaults on the world: the score stage's sampler (caught where it would
    start generating) and what generate ran and recorded are the world's 20 steps at 5.0."""
    from pipeline.api import GenerateConfig, ScoreConfig, generate, score
    from pipeline.stages import score as score_stage

    caught = {}

    class Probe(Exception):
        pass

    def probe(pipe, out, steps, guidance, inception_batch, resolution=None):
        caught.update(steps=steps, guidance=guidance, resolution=resolution)
        raise Probe

    monkeypatch.setattr(score_stage.scoring, "FPFeatures", probe)
    with pytest.raises(Probe):
        score(ScoreConfig(model="embedded", limit=40, n_reference=20, run_dir=str(tmp_path / "s")))
    meta = json.loads((tmp_path / "s" / "scored" / "meta.json").read_text())["signature"]
    out = generate(GenerateConfig(model="embedded", n=2, run_dir=str(tmp_path / "g")))
    ran = json.loads((out / "manifest.json").read_text())["sampling"]
    assert caught == {"steps": 20, "guidance": 5.0, "resolution": 32}
    assert (ran["steps"], ran["guidance"], ran["resolution"], ran["scheduler"]) == (20, 5.0, 32, "ddim")
    assert (meta["steps"], meta["guidance"], meta["scheduler"]) == (20, 5.0, "ddim")


def test_a_scored_set_of_another_sampler_is_refused(tmp_path):
    from pipeline.fit import main

    scored = tmp_path / "scored"
    scored.mkdir()
    assert scored_sampler(scored) is None  # no manifest: not a score-stage set, no known sampler
    (scored / "manifest.json").write_text(json.dumps({"signature": {"steps": 25, "guidance": 5.0,
                                                                    "scheduler": "ddim"}}))
    recorded = scored_sampler(scored)
    assert recorded == {"steps": 25, "guidance": 5.0, "scheduler": "ddim"}
    check_same_sampler(recorded, dict(recorded), "a", "b")  # the same sampler passes
    check_same_sampler({"steps": 25, "guidance": 5.0, "scheduler": None}, dict(recorded), "a", "b")  # not recorded
    with pytest.raises(ValueError, match=r"the scored set was sampled with steps 25, guidance 5.0, scheduler ddim "
                                         r"but q2b samples with steps 20, guidance 5.0, scheduler ddim \(differs in "
                                         r"steps\)"):
        check_same_sampler(recorded, {"steps": 20, "guidance": 5.0, "scheduler": "ddim"}, "the scored set", "q2b")
    meta = {"criterion": "t2q", "sampler": recorded}
    with pytest.raises(ValueError, match="differs in guidance, scheduler"):
        check_deployed_sampler(meta, tmp_path, {"steps": 25, "guidance": 7.5, "scheduler": "euler"}, "evaluate")
    check_deployed_sampler({**meta, "criterion": "length"}, tmp_path, {"steps": 25, "guidance": 7.5,
                                                                        "scheduler": "euler"}, "evaluate")

    # the q2b stage: a T2Q whose targets were drawn at 25 steps, deployed on a 2-step state, is refused
    # before any training
    main(["calibrate", "--model", "tiny-random", "--prompts", "builtin", "--cali-n", "2", "--steps", "2",
          "--a-bit-options", "8,16", "--run-dir", str(tmp_path / "cal")])
    t2q = tmp_path / "t2q"
    t2q.mkdir()
    (t2q / "t2q.json").write_text(json.dumps({"format": "qlip-t2q/1", "scored": str(scored), "hidden": 8,
                                              "text_tower": {"model": "tiny-random"}}))
    (t2q / "t2q.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"the scored set of --t2q .* was sampled with steps 25, guidance 5.0, "
                                         r"scheduler ddim but q2b .* samples with steps 2, guidance 7.5, scheduler "
                                         r"ddim \(differs in steps, guidance\)"):
        main(["q2b", "--model", "tiny-random", "--quant-state", str(tmp_path / "cal" / "quant"), "--t2q", str(t2q),
              "--prompts", "builtin", "--run-dir", str(tmp_path / "q")])
