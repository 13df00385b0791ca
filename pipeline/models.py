"""Model loading: any diffusers text-to-image pipeline, the embedded default,
a seeded tiny pipeline, the real CLIP BPE tokenizer built offline, and the
published UNet configs of SD v1.4, BK-SDM-Tiny and SDXL-base for
architecture tests on the meta device."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import huggingface_hub
import torch

from data.tokenizer import clip_tokenizer
from pipeline.quant import load_quantized

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO_ROOT / "checkpoints"
EMBEDDED_DIR = CHECKPOINTS / "tiny-world"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SDXL = "tiny-random-sdxl"
EMBEDDED = "embedded"


class ModelNotFoundError(ValueError):
    """A --model value that names nothing loadable here."""


# ---------------------------------------------------------------------------
# Published UNet configs (diffusers `unet/config.json`, non-default keys).
# ---------------------------------------------------------------------------
SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
)

# nota-ai/bk-sdm-tiny: SD v1.4 without the mid block, the innermost stage and
# one resnet/attention pair per stage (Kim et al., 2023).
BKSDM_TINY_UNET_CONFIG = dict(
    SD14_UNET_CONFIG,
    layers_per_block=1,
    block_out_channels=(320, 640, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type=None,
)

SDXL_BASE_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)

# CompVis/stable-diffusion-v1-4's vae/, text_encoder/ (CLIP ViT-L/14's text tower; SDXL's first encoder too)
# and scheduler/ configs; stabilityai/stable-diffusion-xl-base-1.0's text_encoder_2 (OpenCLIP ViT-bigG/14)
SD14_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512,
)
CLIP_L_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
CLIP_BIGG_TEXT_CONFIG = dict(
    CLIP_L_TEXT_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)
SD14_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


REFERENCE_UNET_CONFIGS = {
    "sd-v1-4": SD14_UNET_CONFIG,
    "bk-sdm-tiny": BKSDM_TINY_UNET_CONFIG,
    "sdxl-base": SDXL_BASE_UNET_CONFIG,
}
# Parameter counts of the published checkpoints' UNets, for the config tests.
REFERENCE_UNET_PARAMS = {"sd-v1-4": 859_520_964, "bk-sdm-tiny": 323_384_964, "sdxl-base": 2_567_463_684}


def meta_unet(name: str):
    """A published UNet architecture on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    if name not in REFERENCE_UNET_CONFIGS:
        raise ModelNotFoundError(f"unknown reference UNet {name!r}; choose one of {sorted(REFERENCE_UNET_CONFIGS)}")
    with torch.device("meta"):
        return UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[name])


def reference_pipeline(name: str, seed: int = 0, sample_size: int | None = None):
    """A published architecture ("sd-v1-4", "bk-sdm-tiny" or "sdxl-base") as a full pipeline with seeded random
    weights and the family's own scheduler (PNDM for SD, Euler for SDXL), for rehearsals at real size without
    the hub. `sample_size` (latent side) lowers the default resolution."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in REFERENCE_UNET_CONFIGS:
        raise ModelNotFoundError(f"unknown reference model {name!r}; choose one of {sorted(REFERENCE_UNET_CONFIGS)}")
    torch.manual_seed(seed)
    unet_cfg = {**REFERENCE_UNET_CONFIGS[name], **({"sample_size": sample_size} if sample_size else {})}
    unet = diffusers.UNet2DConditionModel(**unet_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    if name == "sdxl-base":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=diffusers.AutoencoderKL(**SD14_VAE_CONFIG, scaling_factor=0.13025, force_upcast=True),
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT_CONFIG)),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL(**SD14_VAE_CONFIG), text_encoder=text_encoder, tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=diffusers.PNDMScheduler(**SD14_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_example_inputs(unet, batch: int = 2, resolution: int | None = None, device="meta", tokens: int = 77):
    """Positional/keyword inputs of one UNet call (the CFG batch by default).

    `resolution` is in pixels (the latent is 1/8 of it for SD-family VAEs)."""
    cfg = unet.config
    side = cfg.sample_size if resolution is None else resolution // 8
    sample = torch.zeros(batch, cfg.in_channels, side, side, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    ctx = torch.zeros(batch, tokens, cfg.cross_attention_dim, device=device)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, device=device),
            "time_ids": torch.zeros(batch, 6, device=device),
        }
    return (sample, t, ctx), kwargs


# ---------------------------------------------------------------------------
# The real CLIP BPE tokenizer, built offline from open_clip's vocabulary.
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The seeded tiny pipeline (same classes as Stable Diffusion, random weights).
# ---------------------------------------------------------------------------
TINY_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=16,
    sample_size=32,
)
TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of tiny, seeded random components."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SDXL's shape in miniature: two text encoders whose last-but-one hidden states are
# concatenated (cross_attention_dim = 32 + 32), and added conditioning of the second
# encoder's projected pooled embedding plus six time ids (6 * 8 + 32 = 80 inputs).
TINY_SDXL_TEXT_CONFIG = dict(TINY_TEXT_CONFIG, hidden_size=32, intermediate_size=64, projection_dim=32)
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
    transformer_layers_per_block=(1, 1), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    interpolation_type="linear", prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    use_karras_sigmas=False,
)


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline of tiny, seeded random components (SDXL's own Euler scheduler)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_CONFIG))
    vae = AutoencoderKL(**TINY_VAE_CONFIG, scaling_factor=0.13025)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sdxl(pipe) -> bool:
    """SDXL-style: the UNet reads added conditioning (pooled text embedding + time ids)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def pooled_text_encoder(pipe) -> tuple:
    """(tokenizer, text encoder) whose pooled output T2Q reads: SDXL's second encoder (the
    one whose projected pooled embedding its UNet reads), else the only one."""
    if is_sdxl(pipe):
        return pipe.tokenizer_2, pipe.text_encoder_2
    return pipe.tokenizer, pipe.text_encoder


# ---------------------------------------------------------------------------
# Loading by name, local path or hub id.
# ---------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def default_model() -> str:
    """The embedded world when it ships, else the seeded tiny pipeline."""
    return EMBEDDED if (EMBEDDED_DIR / "model_index.json").is_file() else TINY_RANDOM


def not_cached(model: str, why: str = "") -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {model!r} is not in the local Hugging Face cache and this run is offline. Download it where the hub "
        f"is reachable (`huggingface-cli download {model} --local-dir DIR`) and pass --model DIR, or pass "
        f"--allow-download.{f' ({why})' if why else ''}")


def check_model(model: str, allow_download: bool = False) -> None:
    """What can be said of a --model value without loading it: a known name (the embedded world only
    where it ships), an existing path (check_pipeline_dir reads it when it loads) or a hub id (offline:
    one whose model_index.json is in the local cache)."""
    model = str(model)
    names = (f"{EMBEDDED!r}, {TINY_RANDOM!r}, {TINY_RANDOM_SDXL!r}, a local diffusers folder, or a hub id such as "
             f"nota-ai/bk-sdm-tiny")
    if model == EMBEDDED and not (EMBEDDED_DIR / "model_index.json").is_file():
        raise ModelNotFoundError(f"the embedded model is not in {EMBEDDED_DIR}; run `python -m pipeline.fit "
                                 f"pretrain` or use --model {TINY_RANDOM}")
    if model in (EMBEDDED, TINY_RANDOM, TINY_RANDOM_SDXL) or Path(model).expanduser().exists():
        return
    if _HUB_ID.match(model):
        cached = huggingface_hub.try_to_load_from_cache(model, "model_index.json")  # a path when it is there
        if not allow_download and not isinstance(cached, str):
            raise not_cached(model)
        return
    if any(c in model for c in "/\\") or model.startswith((".", "~")):
        raise ModelNotFoundError(f"--model {model}: no such folder; pass {names}")
    raise ModelNotFoundError(f"unknown model {model!r}: pass {names}")


def check_pipeline_dir(path: Path, allow_pickle: bool = False, unet_weights: bool = True) -> None:
    """Refuse a pipeline folder with a missing or unreadable part, naming the file, and
    one whose weights are pickle-only unless `allow_pickle`. `unet_weights=False`: the UNet
    needs only its config (a deployed artifact replaces it)."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(f"{path} is not a diffusers pipeline folder: {index} is missing")
    try:
        parts = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(f"{index} is corrupted ({e}); re-create or re-download the pipeline") from e
    for name, spec in parts.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = path / name
        if name in ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor"):
            if not sub.is_dir():
                raise ModelNotFoundError(f"{sub} is missing (named in {index})")
            continue
        cfg = sub / "config.json"
        if not cfg.is_file():
            raise ModelNotFoundError(f"{cfg} is missing (component {name!r} of {index})")
        if name == "unet" and not unet_weights:
            continue
        weights = list(sub.glob("*.safetensors")) + list(sub.glob("*.bin"))
        if not weights:
            raise ModelNotFoundError(f"no weights in {sub}: expected a *.safetensors file for {name!r}")
        if not allow_pickle and all(w.suffix == ".bin" for w in weights):
            raise ModelNotFoundError(
                f"{sub} holds only pickle weights ({weights[0].name}): unpickling can run arbitrary code, so they "
                f"are not loaded by default; convert them to safetensors, or pass --allow-pickle true if you "
                f"trust the files")
        for w in weights:
            if w.suffix == ".safetensors":
                _check_safetensors(w)


def _check_safetensors(path: Path) -> None:
    """Parse the header and check the file holds every byte it promises."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, MemoryError) as e:
        raise ModelNotFoundError(f"{path} is corrupted: unreadable safetensors header ({e})") from e
    if size < 8 + n + end:
        raise ModelNotFoundError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}")


# --scheduler NAME -> the diffusers class; its config comes from the model's own scheduler
SCHEDULERS = {
    "pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler",
}


def check_scheduler(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"--scheduler {name!r} is not supported; choose one of {', '.join(SCHEDULERS)} "
                         f"(or leave it out for the model's own scheduler)")


def set_scheduler(pipe, name: str | None):
    """Swap `pipe.scheduler` for scheduler `name` built from the model's own scheduler config
    (its betas, prediction type and steps_offset); None keeps the model's own."""
    check_scheduler(name)
    if name is None:
        return pipe
    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {"skip_prk_steps": True} if name == "pndm" else {}  # PLMS, as SD's own PNDM config
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


def scheduler_name(pipe) -> str:
    """The --scheduler name of the pipeline's scheduler (its class name when not in SCHEDULERS)."""
    cls = type(pipe.scheduler).__name__
    return next((k for k, v in SCHEDULERS.items() if v == cls), cls)


# ---------------------------------------------------------------------------
# Sampling defaults: the model's own, else its family's published ones.
# ---------------------------------------------------------------------------
# (steps, guidance) the families' model cards and diffusers pipelines default to
FAMILY_SAMPLING = {"sd": (50, 7.5), "sdxl": (50, 5.0)}
# A model folder declares its sampler in sampling.json, or under "sampling" in world.json (the embedded world):
# {"num_inference_steps": N, "guidance_scale": G[, "resolution": PIXELS]}
SAMPLING_FILES = ("sampling.json", "world.json")


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampler settings a stage runs with (steps, CFG scale, side in pixels, scheduler) and where each came from."""

    steps: int
    guidance: float
    resolution: int
    scheduler: str
    origin: dict

    def as_dict(self) -> dict:
        return asdict(self)

    def sampler(self) -> dict:
        """What must match between the scored set and the deployed sampler."""
        return {"steps": self.steps, "guidance": self.guidance, "scheduler": self.scheduler}


def model_family(pipe) -> str:
    """'sdxl' for pipelines with SDXL's added (text, time) conditioning, else 'sd' (SD 1.x / 2.x and the world)."""
    return "sdxl" if is_sdxl(pipe) else "sd"


def declared_sampling(folder: str | Path | None) -> tuple[dict, str | None]:
    """The sampler a model folder declares ({} and None when it declares none)."""
    if not folder or not Path(folder).is_dir():
        return {}, None
    for name in SAMPLING_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelNotFoundError(f"{path} is corrupted ({e}); fix or remove it") from e
        block = data if name == "sampling.json" else data.get("sampling")
        if block:
            unknown = set(block) - {"num_inference_steps", "guidance_scale", "resolution"}
            if unknown:
                raise ValueError(f"{path} declares unknown sampling keys {sorted(unknown)}; use num_inference_steps, "
                                 f"guidance_scale, resolution")
            return block, str(path)
    return {}, None


def sampling_defaults(pipe, steps: int | None = None, guidance: float | None = None,
                      resolution: int | None = None) -> SamplingDefaults:
    """Every stage's sampler settings: a given value wins, else the model folder's declaration
    (SAMPLING_FILES), else the family's published defaults (FAMILY_SAMPLING; the side is the UNet's
    sample_size x the VAE's scale factor, 512/768 for SD, 1024 for SDXL); the scheduler is the pipeline's
    own (after --scheduler). `pipe` is a loaded pipeline (load_pipeline)."""
    declared, where = declared_sampling(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path"))
    family = model_family(pipe)
    fam_steps, fam_guidance = FAMILY_SAMPLING[family]
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    fallback = f"{family} family default"
    values, origin = {}, {}
    for key, given, decl, default in (("steps", steps, "num_inference_steps", fam_steps),
                                      ("guidance", guidance, "guidance_scale", fam_guidance),
                                      ("resolution", resolution, "resolution", native)):
        if given is not None:
            values[key], origin[key] = given, "given"
        elif decl in declared:
            values[key], origin[key] = declared[decl], where
        else:
            values[key], origin[key] = default, fallback if key != "resolution" else "unet sample_size x vae scale"
    if int(values["steps"]) < 1:
        raise ValueError(f"--steps {values['steps']} ({origin['steps']}) must be >= 1")
    if float(values["guidance"]) < 0:
        raise ValueError(f"--guidance {values['guidance']} ({origin['guidance']}) must be >= 0")
    side, factor = int(values["resolution"]), int(pipe.vae_scale_factor)
    if side < factor or side % factor:
        raise ValueError(f"--resolution {side} ({origin['resolution']}) must be a positive multiple of the VAE's "
                         f"scale factor {factor}")
    origin["scheduler"] = "the loaded pipeline's (--scheduler, else the model's own)"
    return SamplingDefaults(int(values["steps"]), float(values["guidance"]), side, scheduler_name(pipe), origin)


def load_pipeline(model: str | None = None, *, dtype=torch.float32, allow_download: bool = False, seed: int = 0,
                  scheduler: str | None = None, allow_pickle: bool = False, unet_weights: bool = True):
    """Load a text-to-image pipeline from a name, a local folder or a hub id.

    `model` is "embedded" (the shipped tiny world), "tiny-random" / "tiny-random-sdxl"
    (seeded random tiny SD / SDXL pipelines), a local diffusers folder, or a hub id already in the local
    Hugging Face cache (pass `allow_download=True` to fetch it). `scheduler`
    swaps the model's scheduler (SCHEDULERS). Weights load from safetensors
    only: a folder with pickle-only (.bin) weights is refused unless
    `allow_pickle`, since unpickling can run arbitrary code."""
    model = model or default_model()
    check_model(model, allow_download)
    check_scheduler(scheduler)
    if model == TINY_RANDOM:
        return set_scheduler(tiny_pipeline(seed), scheduler)
    if model == TINY_RANDOM_SDXL:
        return set_scheduler(tiny_sdxl_pipeline(seed), scheduler)
    if model == EMBEDDED:
        model = str(EMBEDDED_DIR)
    path = Path(model).expanduser()
    safe = {} if allow_pickle else {"use_safetensors": True}  # opted in: safetensors where present, else .bin
    if path.exists():
        check_pipeline_dir(path, allow_pickle, unet_weights)
        unet = {} if unet_weights else {"unet": config_unet(str(path))}
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None,
                                                           **unet, **safe)
    else:  # a hub id (check_model)
        try:
            unet = {} if unet_weights else {"unet": config_unet(model, local_files_only=not allow_download)}
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                model, torch_dtype=dtype, local_files_only=not allow_download, safety_checker=None, **unet, **safe
            )
        except Exception as e:
            raise not_cached(model, type(e).__name__) from e
    pipe.set_progress_bar_config(disable=True)
    return set_scheduler(pipe, scheduler)


def config_unet(model: str, **hub) -> diffusers.UNet2DConditionModel:
    """A pipeline folder's (or cached hub id's) UNet built from its config on the meta device: no memory, no
    weights read."""
    config = diffusers.UNet2DConditionModel.load_config(model, subfolder="unet", **hub)
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel.from_config(config)


def load_quantized_pipeline(model: str, quant_state: str | None, **load):
    """The pipeline (`load`: load_pipeline's options) with its UNet quantized as recorded in
    `quant_state`; FP when None."""
    pipe = load_pipeline(model, **load)
    return quantize_pipeline(pipe, quant_state) if quant_state else pipe


def quantize_pipeline(pipe, quant_state: str | Path):
    """Load a calibrated state into `pipe.unet` in place; PTQD states also get
    their noise correction (a hook on the UNet output)."""

    _, _, extra = load_quantized(pipe.unet, quant_state)
    if "ptqd_k" in extra:
        # lazy: ptqd runs trajectories with pipeline.sampling, which imports this module
        from pipeline.calibration.ptqd import apply_ptqd

        apply_ptqd(pipe.unet, extra, pipe)  # the pipeline's scheduler converts v / x0 outputs to eps and back
    return pipe
