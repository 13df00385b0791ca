"""QLIP's T2Q: predict, from the prompt alone, the quality of the FP image.

    pooled CLIP text embedding            (frozen text tower)
    -> CLIP text projection (C x C)       (frozen) -> ReLU
    -> Linear(C, 512) -> ReLU -> Linear(512, 1) -> sigmoid  =  q in [0, 1]

trained with MSE against the GIQA score of the FP image normalized to [0, 1]
over the training split (data/scored.py). The tower and the projection must
come from one CLIP (a projection means nothing on another tower): on the
embedded world the tower is the pipeline's text_encoder and the projection the
world CLIP's `text_projection`; on SDXL both are its second text encoder's (a
CLIPTextModelWithProjection: the pooled embedding SDXL's UNet reads); for SD
1.x/2.x models, whose text encoder has no projection, both come from a
CLIPTextModelWithProjection folder (`clip=`).

    t2q = load_t2q("runs/x/t2q", model="embedded")
    q = t2q.predict(["a red circle"])        # tensor [N] in [0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import mean_squared_error, pearson_corrcoef, spearman_corrcoef

from data.tokenizer import clip_tokenizer
from pipeline.artifacts import ArtifactFormat, load_artifact_tensors, read_artifact_meta, save_artifact
from pipeline.models import EMBEDDED, EMBEDDED_DIR, ModelNotFoundError, check_model
from pipeline.world.io import load_world_clip

T2Q_FORMAT = ArtifactFormat("qlip-t2q", 1, "t2q.safetensors", "t2q.json", "T2Q folder",
                            "train one with `python -m pipeline.fit t2q`", required=("text_tower.model", "hidden"))
HIDDEN = 512


class T2QCheckpointError(ValueError):
    pass


# ---------------------------------------------------------------------------
# The frozen text side
# ---------------------------------------------------------------------------
@dataclass
class TextTower:
    encoder: nn.Module  # a CLIPTextModel(-WithProjection): pooled output = final-LN EOS state
    tokenizer: object
    projection: nn.Linear  # C x P, no bias
    source: dict  # how to load it again: {"model": ..., "clip": ...}


def load_text_tower(model: str = "embedded", clip: str | None = None) -> TextTower:
    """The frozen tower + projection T2Q reads: from `clip` (a local
    CLIPTextModelWithProjection folder) when given, else the model's own: an SDXL
    folder's text_encoder_2, or the embedded world's text encoder and CLIP."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if clip:
        path = Path(clip)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"--clip {clip} is not a local CLIPTextModelWithProjection folder "
                                     f"(config.json missing), e.g. a download of openai/clip-vit-large-patch14")
        full = CLIPTextModelWithProjection.from_pretrained(str(path))
        tok = CLIPTokenizer.from_pretrained(str(path)) if (path / "vocab.json").is_file() else clip_tokenizer()
        tower = getattr(full, "text_model", full)  # the transformer alone: its pooler_output is the EOS state
        return TextTower(tower, tok, full.text_projection, {"model": model, "clip": str(path)})
    check_model(model)  # a missing folder is named as such, not as a model without a CLIP projection
    root = EMBEDDED_DIR if model == EMBEDDED else Path(model)
    second = root / "text_encoder_2"
    if (second / "config.json").is_file() and not (root / "clip" / "config.json").is_file():
        # SDXL: its second encoder is a CLIPTextModelWithProjection whose projected pooled embedding
        # the UNet reads; T2Q reads the same pooled state through the same projection
        full = CLIPTextModelWithProjection.from_pretrained(str(second))
        tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"))
        return TextTower(full.text_model, tok, full.text_projection, {"model": model, "clip": None})
    if not (root / "clip" / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {model!r} has no CLIP text projection ({root / 'clip'} is missing; SD text encoders have "
            f"none): pass --clip PATH, a local CLIPTextModelWithProjection folder matching its text encoder")

    world_clip, _ = load_world_clip(root)
    encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"))
    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    return TextTower(encoder, tok, world_clip.text_projection, {"model": model, "clip": None})


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------
def warmup_fraction(frac: float, total: int) -> float:
    """OneCycleLR's pct_start for `total` steps: at least 2 warm-up steps (0.75 of 1 or 2 steps). OneCycleLR
    divides by pct_start * total - 1, so a warm-up of exactly one step (e.g. 0.05 of 20) crashes it."""
    return min(max(frac, 2.0 / total), 0.75)


class T2QModule(L.LightningModule):
    def __init__(self, tower: TextTower, hidden: int = HIDDEN, lr: float = 1e-3, weight_decay: float = 1e-4,
                 warmup_frac: float = 0.05, patience: int = 0):
        """`patience` > 0: early stopping on the validation MSE. After every validation epoch the head of the
        best epoch so far is kept (in memory); training stops after `patience` epochs without a better one,
        and `restore_best()` puts the best head back. 0: every epoch is trained and the last head is kept."""
        super().__init__()
        if patience < 0:
            raise ValueError(f"--patience {patience} must be >= 0 (0: no early stopping)")
        self.save_hyperparameters(ignore=["tower"])
        self.history: list[dict] = []  # per epoch: train and val MSE
        self.best: dict | None = None  # {"epoch", "val_mse", "head"} of the best validation epoch
        self._train_sq = [0.0, 0]  # this epoch's squared error sum and count
        self.text_encoder, self.tokenizer, self.source = tower.encoder.eval(), tower.tokenizer, tower.source
        self.text_encoder.requires_grad_(False)
        c_in, c_proj = tower.projection.in_features, tower.projection.out_features
        self.projection = nn.Linear(c_in, c_proj, bias=False)
        self.projection.load_state_dict(tower.projection.state_dict())
        self.projection.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(c_proj, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self._pooled: dict[str, torch.Tensor] = {}  # frozen tower: one pass per training prompt suffices
        self._make_metrics()

    def _make_metrics(self) -> None:
        import warnings

        from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef

        with warnings.catch_warnings():  # Spearman keeps every prediction: a few thousand floats here
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
            self.val_metrics = MetricCollection({"mse": MeanSquaredError(), "pearson": PearsonCorrCoef(),
                                                 "spearman": SpearmanCorrCoef()}, prefix="val/")

    def train(self, mode: bool = True) -> "T2QModule":
        super().train(mode)
        self.text_encoder.eval()  # frozen parts never switch to training behaviour
        return self

    # -- text -> pooled embedding -----------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str], cache: bool = True) -> torch.Tensor:
        """Pooled CLIP text embeddings [N, C]; with `cache`, kept per prompt (training
        revisits the same prompts every epoch; `predict` on arbitrary prompts does not)."""
        store = self._pooled if cache else {}
        todo = [p for p in dict.fromkeys(prompts) if p not in store]
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            ids = self.tokenizer(chunk, padding="longest", truncation=True, max_length=self.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids.to(self.device)
            pooled = self.text_encoder(input_ids=ids).pooler_output
            store.update(zip(chunk, pooled.detach().float().cpu()))
        return torch.stack([store[p] for p in prompts]).to(self.device)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(F.relu(self.projection(pooled)))).squeeze(-1)

    @torch.no_grad()
    def predict(self, prompts: Sequence[str]) -> torch.Tensor:
        """Predicted quality [N] in [0, 1] of each prompt's FP image."""
        return self.predict_pooled(self.encode(list(prompts), cache=False))

    @torch.no_grad()
    def predict_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Quality [N] from pooled text embeddings [N, C] (computed elsewhere by this same tower)."""
        return self(pooled.to(self.device, self.projection.weight.dtype)).cpu()  # no dropout/BN: mode-free

    def reads_same_text_as(self, tokenizer, text_encoder) -> bool:
        """Whether a pipeline's tokenizer + text encoder give exactly this tower's pooled
        embeddings (same weights, same token ids), so its text-encoder pass can be shared."""
        mine, theirs = (getattr(e, "text_model", e) for e in (self.text_encoder, text_encoder))
        a, b = mine.state_dict(), theirs.state_dict()
        same = a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu().to(a[k].dtype)) for k in a)
        if not same:
            return False
        probe = "a small red circle and two striped squares, photo"
        return self.tokenizer(probe).input_ids == tokenizer(probe).input_ids

    # diffusers-style names for what save_t2q / load_t2q do
    def save_pretrained(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        return save_t2q(self, out_dir, extra)

    @classmethod
    def from_pretrained(cls, path: str | Path, model: str | None = None, clip: str | None = None) -> "T2QModule":
        return load_t2q(path, model, clip)

    def memory_bytes(self) -> int:
        """Parameter bytes of the projection + the trained head (QLIP reports 1.5 MB)."""
        return sum(p.numel() * p.element_size() for m in (self.projection, self.head) for p in m.parameters())

    # -- training -----------------------------------------------------------------
    def training_step(self, batch, _):
        loss = F.mse_loss(self(self.encode(batch["prompt"])), batch["target"])
        self.log("train/mse", loss, prog_bar=True, batch_size=len(batch["target"]))
        self._train_sq[0] += float(loss.detach()) * len(batch["target"])
        self._train_sq[1] += len(batch["target"])
        return loss

    def validation_step(self, batch, _):
        self.val_metrics.update(self(self.encode(batch["prompt"])), batch["target"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # compute() syncs across processes: every rank decides alike
        self.log_dict(values, prog_bar=True)
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        mse = float(values["val/mse"])
        total, n = self._train_sq
        # the running MSE of the epoch's batches (the head moves during the epoch), this process's share
        self.history.append({"epoch": self.current_epoch, "val_mse": mse, "train_mse": total / n if n else None})
        self._train_sq = [0.0, 0]
        if self.hparams.patience <= 0:
            return
        if self.best is None or mse < self.best["val_mse"]:
            self.best = {"epoch": self.current_epoch, "val_mse": mse,
                         "head": {k: v.detach().clone() for k, v in self.head.state_dict().items()}}
        elif self.current_epoch - self.best["epoch"] >= self.hparams.patience:
            self.trainer.should_stop = True

    def restore_best(self) -> dict | None:
        """Put the best validation epoch's head back (early stopping); returns what was selected, or None
        without early stopping or validation."""
        if self.best is None:
            return None
        self.head.load_state_dict(self.best["head"])
        return {"best_epoch": self.best["epoch"], "best_val_mse": self.best["val_mse"],
                "epochs_run": len(self.history), "patience": self.hparams.patience}

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.head.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=h.lr, total_steps=total,
                                                    pct_start=warmup_fraction(h.warmup_frac, total),
                                                    anneal_strategy="cos")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------------------
# safetensors + JSON (no pickle)
# ---------------------------------------------------------------------------
def t2q_state(module: T2QModule) -> tuple[dict[str, torch.Tensor], dict]:
    """What a T2Q stores: the projection and the head's tensors, and the JSON that names its frozen text tower
    (`t2q_from_state` loads that tower again). Shared by the T2Q folder and the deployable artifact."""
    state = {f"projection.{k}": v for k, v in module.projection.state_dict().items()}
    state.update({f"head.{k}": v for k, v in module.head.state_dict().items()})
    config = {"text_tower": module.source, "embed_dim": module.projection.in_features,
              "proj_dim": module.projection.out_features, "hidden": module.hparams.hidden,
              "memory_bytes": module.memory_bytes()}
    return state, config


def save_t2q(module: T2QModule, out_dir: str | Path, extra: dict | None = None) -> Path:
    state, config = t2q_state(module)
    return save_artifact(out_dir, T2Q_FORMAT, state, {**config, **(extra or {})})


def t2q_from_state(config: dict, state: dict[str, torch.Tensor], where: str | Path, model: str | None = None,
                   clip: str | None = None) -> T2QModule:
    """A T2Q (eval mode) from its stored tensors and JSON (`t2q_state`), with the frozen text tower it needs.

    `model` / `clip` default to what it was trained with. A tower whose CLIP projection differs from the
    saved one (another or a retrained model) is refused: the head's inputs would mean something else."""
    src = config["text_tower"]
    tower = load_text_tower(model or src["model"], clip if clip is not None else src.get("clip"))
    saved = state.get("projection.weight")
    if saved is None or saved.shape != tower.projection.weight.shape or \
            not torch.allclose(saved, tower.projection.weight.float(), atol=1e-5):
        raise T2QCheckpointError(
            f"the T2Q in {where} was trained on another text encoder than {tower.source} (its CLIP projection "
            f"differs, e.g. the model was retrained); retrain it with `python -m pipeline.fit t2q`")
    module = T2QModule(tower, hidden=config["hidden"])
    module.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    return module.eval()


def load_t2q(path: str | Path, model: str | None = None, clip: str | None = None) -> T2QModule:
    """A trained T2Q folder (eval mode) with the frozen text tower it needs (`t2q_from_state`)."""
    d = Path(path)
    try:
        config = read_artifact_meta(d, T2Q_FORMAT)
    except ValueError as e:
        raise T2QCheckpointError(str(e)) from e
    return t2q_from_state(config, load_artifact_tensors(d, T2Q_FORMAT), d, model, clip)


def t2q_metrics(module: T2QModule, prompts: Sequence[str], targets) -> dict:
    """MSE / Pearson / Spearman of the module on (prompts, targets), torchmetrics' definitions."""
    pred, y = module.predict(prompts), torch.as_tensor(targets, dtype=torch.float32)
    return {"mse": float(mean_squared_error(pred, y)), "pearson": float(pearson_corrcoef(pred, y)),
            "spearman": float(spearman_corrcoef(pred, y))}


# ---------------------------------------------------------------------------
# Baselines T2Q must beat
# ---------------------------------------------------------------------------
def token_lengths(prompts: Sequence[str], tokenizer) -> list[int]:
    """Tokens per prompt, BOS/EOS excluded, untruncated (the paper's prompt-length criterion)."""
    return [len(ids) - 2 for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids]


def baselines_by_split(train_prompts, train_y, splits: dict, tokenizer) -> dict:
    """{split: MSE of a constant (the train mean) and of a linear regression on token length, both fitted on
    train, and the length's Spearman} for each `splits` entry name -> (prompts, targets); an empty split
    is left out."""
    import numpy as np  # scipy is slow to import; the stage's report alone needs it
    from scipy.stats import spearmanr

    ty = np.asarray(train_y, dtype=np.float64)
    tl = np.asarray(token_lengths(train_prompts, tokenizer))
    slope, intercept = np.polyfit(tl, ty, 1) if np.ptp(tl) > 0 else (0.0, ty.mean())
    out = {}
    for name, (prompts, y) in splits.items():
        if not len(prompts):
            continue
        y, lengths = np.asarray(y, dtype=np.float64), np.asarray(token_lengths(prompts, tokenizer))
        rho = spearmanr(lengths, y).statistic if np.ptp(lengths) > 0 and np.ptp(y) > 0 else float("nan")
        out[name] = {"constant_mse": float(((y - ty.mean()) ** 2).mean()),
                     "length_mse": float(((y - (slope * lengths + intercept)) ** 2).mean()),
                     "length_spearman": float(rho)}
    return out


def baselines(train_prompts, train_y, val_prompts, val_y, tokenizer) -> dict:
    """Validation MSE of a constant (the train mean) and of a linear regression on token length."""
    return baselines_by_split(train_prompts, train_y, {"val": (val_prompts, val_y)}, tokenizer)["val"]
