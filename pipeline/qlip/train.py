"""Training Q2B: relaxed decisions on the quality-weighted distortion, with the
bit cost steered to a target FAB by a dual variable (T2Q and the UNet's
quantizers frozen).

Data: calibration data (pipeline/calibration/data.py) at *every* sampling step, since
each (layer, step) entry needs its own signal, with each prompt's quality q
and FP guided noise prediction. One item = one prompt batch at one step (a
UNet call runs one step).

    loss = mean_i w(q_i) D_i / D_ref  +  lam * g  +  rho / 2 * g^2
    D_i   = ||eps_q - eps_fp||^2 / ||eps_fp||^2 of prompt i's guided noise prediction, in eps space
            whatever the UNet predicts (v and x0 outputs are converted, pipeline/prediction.py), so D
            compares across prediction types
    w(q)  = exp(kappa z(q)), normalized to mean 1 over the training prompts (increasing in q)
    g     = (FAB_t - target) / (max option - min option), FAB_t the batch's FAB at this step
    lam  <- lam + eta * (FAB - target) / range after every step, FAB = the batch's hard FAB

Why these choices:
- D_ref (distortion with every layer at the lowest option) makes the
  distortion term O(1) on any model, so one dual step size fits all models.
- lam may take either sign: the FAB is steered to the target from both sides
  (an equality constraint). A budget (lam >= 0) was tried first: once a dual
  overshoot drops the FAB below the target, lam sits at 0 and only the weak
  distortion gradient climbs back, so short runs ended 2 bits under target.
  Plain dual ascent (rho = 0) oscillated by +-8 bits: the dual variable
  integrates the gap faster than Adam moves the tables. Read as a controller,
  rho * g is the proportional term and lam the integral term; a dominant
  proportional term (rho = 10, eta = 0.3) lands within ~0.5 bit of the target.
- The cost term covers only the step being trained, so distortion and cost
  gradients reach each (layer, step) entry equally often.
- The forward pass uses the hard decision (straight-through), so the UNet sees
  only deployable bit choices and the dual variable watches the hard FAB.

Resume (`Q2BProgress`): after every epoch the tables, Adam's moments, the dual variable, the
history and every random state (the global generator for the Gumbel noise, the loader's for the
order; per process under DDP) go to a safetensors + JSON checkpoint. A rerun under the same
settings restores them and trains only the remaining epochs, so the result equals an
uninterrupted run's (tests/test_faults.py)."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from pipeline.artifacts import (
    check_progress,
    jsonable,
    load_tensors,
    matches_checksum,
    save_tensors,
    sha256_file,
    write_json_atomic,
)
from pipeline.engine import make_trainer
from pipeline.metrics.cost import weighted_fab
from pipeline.prediction import PredictionSpace
from pipeline.qlip.q2b import Q2BModule, check_target_fab
from pipeline.quant import bit_mixture, get_bit_policy, set_bit_policy, set_quant_state, set_step
from pipeline.sampling import Conditioning
from pipeline.shards import tensor_nbytes


def guided_eps(unet, x, t, text: Conditioning, guidance: float, space: PredictionSpace | None = None) -> torch.Tensor:
    """The CFG-guided UNet output at (x, t); with `space`, converted to eps (guidance commutes with the
    conversion, which is affine in the output with the same x_t term for both branches)."""
    out_u, out_c = unet(torch.cat([x, x]), t, **text.unet_kwargs()).sample.chunk(2)
    out = out_u + guidance * (out_c - out_u)
    return out if space is None else space.to_eps(out, x, t)


def item_text(item: dict) -> Conditioning:
    """The text conditioning stored flat in a training item (DataLoader-friendly tensors)."""
    return Conditioning.from_tensors(item)


def relative_error(eps: torch.Tensor, eps_fp: torch.Tensor) -> torch.Tensor:
    """Per-sample ||eps - eps_fp||^2 / ||eps_fp||^2."""
    return (eps - eps_fp).pow(2).flatten(1).sum(1) / eps_fp.pow(2).flatten(1).sum(1).clamp_min(1e-12)


@torch.no_grad()
def training_items(unet, data, quality: torch.Tensor, device="cpu", store=None, share: tuple[int, int] = (0, 1)):
    """One item per (prompt shard, step) of `data` (a CalibrationData), with the
    FP guided noise prediction (in eps space, `data.space`) as target. Run it on
    the *FP* UNet (before the quantized state and any PTQD correction are loaded).

    Items go to `store` (a pipeline.shards.ItemStore; default a list in RAM). `share` = (rank, world):
    a DDP process builds and keeps every world-th item only."""
    rank, world = share
    meta = data.meta
    guidance, bs = float(meta["signature"]["guidance"]), meta["batch_size"]
    if len(quality) != meta["n_prompts"]:
        raise ValueError(f"{len(quality)} quality values for {meta['n_prompts']} calibration prompts")
    missing = sorted(set(range(meta["signature"]["steps"])) - set(data.steps))
    if missing:
        raise ValueError(f"Q2B needs calibration data at every step; {data.path} lacks steps {missing[:5]} "
                         f"(collect it with cali_st = steps)")
    space = data.space
    items = [] if store is None else store
    for k, (step, x, t, text) in enumerate(data.batches()):
        if k % world != rank:
            continue
        b = k // len(data.steps)
        x, text = x.to(device), text.to(device)
        t = torch.tensor(t, device=device)
        eps_fp = guided_eps(unet, x, t, text, guidance, space).float()  # fp32 also after an autocast pass
        text.pooled = None  # T2Q's input: not needed by the UNet
        items.append({"step": step, "x": x, "t": t, **{n: v for n, v in vars(text).items() if v is not None},
                      "q": quality[b * bs:b * bs + len(x)].float().to(device), "eps_fp": eps_fp,
                      "space": space.to_meta()})  # plain values: an item may go to a disk shard
    return items


def item_distortion(unet, item: dict, guidance: float) -> torch.Tensor:
    """Per-prompt D of one training item under the UNet's current bits, in eps space (the item's `space`)."""
    space = PredictionSpace.from_meta(item["space"]) if "space" in item else None
    eps = guided_eps(unet, item["x"], item["t"], item_text(item), guidance, space)
    return relative_error(eps, item["eps_fp"])


def item_bytes(data) -> int:
    """Bytes of one training item of `data`: x and its FP target, the text conditioning, q and t."""
    _, x, _, text = next(data.batches())
    text.pooled = None
    return 2 * tensor_nbytes(x) + sum(tensor_nbytes(v) for v in text.tensors().values()) + 4 * len(x) + 8


@torch.no_grad()
def reference_distortion(unet, items: list[dict], bits: int, guidance: float, n: int = 8) -> float:
    """Mean D with every layer at `bits` (the lowest option) over up to `n` items spread over the steps."""
    before = get_bit_policy(unet)
    set_bit_policy(unet, bits)
    set_quant_state(unet, True, True)
    picks = items[:: max(1, len(items) // n)][:n]
    d = []
    for it in picks:
        set_step(unet, it["step"])
        d.append(item_distortion(unet, it, guidance))
    set_bit_policy(unet, before)
    return float(torch.cat(d).mean())


class Q2BTraining(L.LightningModule):
    """The UNet is frozen; only the Q2B tables and gates learn."""

    def __init__(self, unet, q2b: Q2BModule, fab_weights: torch.Tensor, target_fab: float, guidance: float,
                 d_ref: float, w_norm: float, kappa: float = 1.0, lr: float = 0.05, dual_lr: float = 0.3,
                 rho: float = 10.0, tau: tuple[float, float] = (1.0, 0.2), noise: bool = True):
        super().__init__()
        self.unet, self.q2b = unet, q2b
        for p in unet.parameters():
            p.requires_grad_(False)
        self.register_buffer("fab_w", fab_weights.float())
        self.target, self.guidance, self.d_ref, self.w_norm, self.kappa = target_fab, guidance, d_ref, w_norm, kappa
        self.lr, self.dual_lr, self.rho, self.tau_range, self.noise = lr, dual_lr, rho, tau, noise
        self.range = float(max(q2b.bit_options) - min(q2b.bit_options))
        self.lam = 0.0
        self.history: list[dict] = []
        self._epoch: list[tuple] = []
        # set by a resume (Q2BProgress.restore): epochs and optimizer steps done before this fit
        self.epoch_offset, self.step_offset = 0, 0
        self.resume_optimizer: dict | None = None
        self.progress: Q2BProgress | None = None  # saves a checkpoint after every epoch

    def weight(self, q: torch.Tensor) -> torch.Tensor:
        """w(q): increasing in q, mean 1 over the training prompts."""
        return torch.exp(self.kappa * (q - self.q2b.q_mean) / self.q2b.q_std) / self.w_norm

    @property
    def epoch(self) -> int:
        """The epoch over the whole training, resumed or not."""
        return self.epoch_offset + self.current_epoch

    def tau(self) -> float:
        """Temperature, annealed geometrically over the whole training (a resumed fit runs only its rest)."""
        total = max(1, self.trainer.estimated_stepping_batches + self.step_offset - 1)
        frac = min(1.0, (self.global_step + self.step_offset) / total)
        return self.tau_range[0] * (self.tau_range[1] / self.tau_range[0]) ** frac

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.q2b.parameters(), lr=self.lr)
        if self.resume_optimizer is not None:
            opt.load_state_dict(self.resume_optimizer)
        return opt

    def training_step(self, batch, batch_idx):
        step, q = int(batch["step"]), batch["q"]
        tau = self.tau()
        cols = slice(step, step + 1)
        choice = self.q2b.relaxed(q, cols, tau, noise=self.noise)[:, :, 0]  # [n, L, K]
        set_step(self.unet, step)
        with bit_mixture(self.unet, torch.cat([choice, choice]).transpose(0, 1), self.q2b.bit_options):
            d = item_distortion(self.unet, batch, self.guidance)
        dist = (self.weight(q) * d).mean() / self.d_ref
        bits = self.q2b.relaxed(q, cols, tau, noise=False) @ self.q2b.options  # [n, L, 1]
        gap = (weighted_fab(bits, self.fab_w).mean() - self.target) / self.range
        loss = dist + self.lam * gap + 0.5 * self.rho * gap ** 2
        with torch.no_grad():  # dual ascent on the hard FAB of the batch's prompts (all steps)
            fab = weighted_fab(self.q2b(q).float(), self.fab_w).mean()
            fab = self.trainer.strategy.reduce(fab, reduce_op="mean")
            self.lam = self.lam + self.dual_lr * float(fab - self.target) / self.range
        self._epoch.append((float(d.detach().mean()), float(fab), float(dist.detach())))
        self.log_dict({"distortion": d.mean(), "fab": fab, "lambda": self.lam, "tau": tau}, prog_bar=True,
                      batch_size=len(q))
        return loss

    def on_train_epoch_end(self) -> None:
        if self._epoch:
            d, fab, dist = (sum(v) / len(v) for v in zip(*self._epoch))
            self.history.append({"epoch": self.epoch, "distortion": d, "weighted_distortion": dist,
                                 "fab": fab, "lambda": self.lam, "tau": self.tau()})
        self._epoch = []
        if self.progress is not None:
            self.progress.save(self)


class Q2BProgress:
    """Q2B's epoch checkpoint in `folder`: `progress.json` (signature, epochs done, dual variable,
    history, Adam's hyper-parameters, file checksums) and per epoch `epoch_NNNN.safetensors` (tables,
    Adam's moments, rank 0's random states) plus `rng_rankR_NNNN.safetensors` for the other processes.
    The JSON is written last, after every process has written its file, so a kill at any point leaves
    the previous epoch's checkpoint whole."""

    def __init__(self, folder: str | Path, signature: dict, loader_generator: torch.Generator,
                 discard_stale: bool = False):
        self.folder, self.signature, self.gen = Path(folder), jsonable(signature), loader_generator
        self.record = check_progress(self.folder / "progress.json", self.signature, "Q2B training progress",
                                     discard_stale)
        if self.record is not None and not self._intact(self.record):
            print(f"note: the Q2B checkpoint in {self.folder} does not match its checksums; training from the start")
            self.record = None

    @property
    def epochs_done(self) -> int:
        return 0 if self.record is None else int(self.record["epochs_done"])

    def _intact(self, record: dict) -> bool:
        return all(matches_checksum(self.folder / f, h)
                   for f, h in record.get("sha256", {}).items())

    @staticmethod
    def _random_states(gen: torch.Generator) -> dict[str, torch.Tensor]:
        states = {"rng.cpu": torch.get_rng_state(), "rng.loader": gen.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["rng.cuda"] = torch.cuda.get_rng_state()
        return states

    def save(self, module: Q2BTraining) -> None:
        trainer, epochs = module.trainer, module.epoch + 1
        rank, world = trainer.global_rank, trainer.world_size
        self.folder.mkdir(parents=True, exist_ok=True)
        rng = self.folder / f"rng_rank{rank}_{epochs:04d}.safetensors"
        if rank:
            save_tensors(rng, self._random_states(self.gen))
        else:
            opt = trainer.optimizers[0].state_dict()
            tensors = {f"q2b.{k}": v for k, v in module.q2b.state_dict().items()}
            tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for i, st in opt["state"].items()
                            for k, v in st.items()})
            tensors.update(self._random_states(self.gen))
            save_tensors(self.folder / f"epoch_{epochs:04d}.safetensors", tensors)
        trainer.strategy.barrier()  # every process's file is on disk before the record names them
        if rank == 0:
            files = [f"epoch_{epochs:04d}.safetensors"] + [f"rng_rank{r}_{epochs:04d}.safetensors"
                                                           for r in range(1, world)]
            self.record = {"signature": self.signature, "epochs_done": epochs,
                           "global_step": module.global_step + module.step_offset, "lam": module.lam,
                           "history": module.history, "param_groups": jsonable(opt["param_groups"]),
                           "sha256": {f: sha256_file(self.folder / f) for f in files}}
            write_json_atomic(self.folder / "progress.json", self.record)
            for old in self.folder.glob("*.safetensors"):
                if old.name not in files:
                    old.unlink()
        trainer.strategy.barrier()

    def restore(self, module: Q2BTraining, rank: int = 0) -> None:
        """Put the checkpoint into `module` (before its fit) and the random states into this process."""
        if self.record is None:
            return
        r, n = self.record, self.epochs_done
        fix = f"delete {self.folder} (or re-run q2b with --fresh true) to train from the start"
        main = load_tensors(self.folder / f"epoch_{n:04d}.safetensors", fix)
        module.q2b.load_state_dict({k[4:]: v for k, v in main.items() if k.startswith("q2b.")})
        state: dict[int, dict] = {}
        for k, v in main.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        module.resume_optimizer = {"state": state, "param_groups": r["param_groups"]}
        module.lam, module.history = float(r["lam"]), list(r["history"])
        module.epoch_offset, module.step_offset = n, int(r["global_step"])
        states = main if rank == 0 else load_tensors(self.folder / f"rng_rank{rank}_{n:04d}.safetensors", fix)
        torch.set_rng_state(states["rng.cpu"])
        self.gen.set_state(states["rng.loader"])
        if "rng.cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["rng.cuda"])
        print(f"resuming Q2B training after epoch {n} from {self.folder}")


def fit_q2b(unet, q2b: Q2BModule, items: list[dict], fab_weights: torch.Tensor, target_fab: float,
            guidance: float, epochs: int = 20, seed: int = 0, trainer_kwargs: dict | None = None,
            callbacks: list | None = None, total_items: int | None = None, progress: dict | None = None,
            **hparams) -> Q2BTraining:
    """Train `q2b` on `items` (training_items) against the quantized `unet`.

    `total_items`: the number of items over all processes when each DDP process holds only its own share
    (training_items' `share`); None when every process holds them all. `progress`
    ({"folder", "signature", "discard_stale"}): keep an epoch checkpoint there and resume from it."""

    check_target_fab(target_fab, q2b.bit_options)
    q2b.check_unet(unet)
    d_ref = reference_distortion(unet, items, min(q2b.bit_options), guidance)
    if not d_ref > 0:
        raise ValueError(f"the quantized UNet at {min(q2b.bit_options)} bits matches FP exactly (D = {d_ref}); "
                         f"there is nothing for Q2B to trade")
    q_all = torch.cat([it["q"] for it in items]).cpu()
    kappa = hparams.get("kappa", 1.0)
    w_norm = float(torch.exp(kappa * (q_all - q2b.q_mean.cpu()) / q2b.q_std.cpu()).mean())
    module = Q2BTraining(unet, q2b, fab_weights, target_fab, guidance, d_ref, w_norm, **hparams)
    L.seed_everything(seed, verbose=False)
    gen = torch.Generator().manual_seed(seed)
    if progress is not None:
        module.progress = Q2BProgress(progress["folder"], {**progress["signature"], "epochs": epochs}, gen,
                                      progress.get("discard_stale", False))
    done = module.progress.epochs_done if module.progress else 0
    trainer = make_trainer(trainer_kwargs, progress=True,
                           defaults={"max_epochs": epochs - done, "callbacks": callbacks or []},
                           forced={"use_distributed_sampler": False} if total_items else None)
    if module.progress is not None:
        module.progress.restore(module, trainer.global_rank)
    if total_items:  # each process holds its own share: it shuffles that, as many items per epoch as every rank
        per_rank = -(-total_items // trainer.world_size)
        sampler = RandomSampler(items, replacement=False, num_samples=per_rank, generator=gen)
        loader = DataLoader(items, batch_size=None, sampler=sampler)
    else:
        loader = DataLoader(items, batch_size=None, shuffle=True, generator=gen)
    trainer.fit(module, loader)
    return module


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import spearmanr

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.numel() < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(spearmanr(a.numpy(), b.numpy()).statistic)
