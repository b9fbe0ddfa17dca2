"""CycleGAN trigger learner (Zhu et al. 2017; NNoculation §4.3): domain U = clean validation images,
domain V = the (purified) quarantine. G: U -> V learns to put the trigger on clean images.

As in the reference: ResNet generators, PatchGAN discriminators, least-squares GAN loss, cycle loss weight
10, optional identity loss, a 50-image pool of generated images for the discriminators, Adam 2e-4 with
β = (0.5, 0.999), a constant learning rate and then a linear decay to zero. Sizes adapt to the input
(28x28 gray and larger RGB inputs alike): images are reflect-padded to a multiple of 4 inside the generator.

The generator is judged without labels by a *score* callback (e.g. the flip rate: the share of G(clean)
that the BadNet sends to the quarantine's dominant label); the best-scoring generator is kept and training
stops early when the score plateaus.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edge_agent.options import flag, nonnegative, nonnegative_float, positive
from trainer.science.training import default_device

log = logging.getLogger(__name__)

# Maps uint8 images (N, C, H, W) to a number where higher means a better trigger generator.
Score = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class CycleGANConfig:
    """Architecture and optimisation of the trigger learner. Its flags are ``--gan-FIELD`` (the repair spec's
    ``[repair.gan]`` table, the profiles' ``gan`` table): one name per knob."""

    # base width of the generators and discriminators (Zhu et al.: 64 for 256x256; 16 learns 28x28 triggers at ~95
    # pairs/s on 2 cores)
    width: int = flag(16, "generator and discriminator base width (default: the --profile's)", type=positive)
    blocks: int = flag(6, "generator residual blocks (default: the --profile's)", type=positive)
    epochs: int = flag(60, "epochs at the constant lr (default: the --profile's)", type=positive)
    epochs_decay: int = flag(20, "epochs of linear lr decay (default: the --profile's)", type=nonnegative)
    batch_size: int = flag(16, "batch size (default: the --profile's)", type=positive)
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_cycle: float = 10.0
    # times lambda_cycle, as in the reference; 0 disables
    identity: float = flag(0.5, "identity loss weight (x the cycle weight); 0: off", type=nonnegative_float)
    pool_size: int = 50
    # early stop after this many epochs without a better score (0: never)
    patience: int = flag(20, "early stop after this many epochs without a better score; 0: never (default: the "
                         "--profile's)", type=nonnegative)  # fmt: skip
    min_epochs: int = 10
    seed: int = 0  # the repair's --seed

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints and reports."""
        return asdict(self)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with instance norm and a skip connection."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + F(x)."""
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, two stride-2 downsamplings, residual blocks, two upsamplings, c7s1-out, tanh."""

    def __init__(self, channels: int, ngf: int = 32, n_blocks: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        ch = ngf
        for _ in range(2):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(ch * 2), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> same shape in [-1, 1]; any H, W (padded to a multiple of 4 inside)."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        return self.net(x)[..., :h, :w]


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake scores, each over a patch of the input (70x70 for 256x256 inputs)."""

    def __init__(self, channels: int, ndf: int = 32, n_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            nxt = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, nxt, 4, stride=stride, padding=1), nn.InstanceNorm2d(nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        layers += [nn.Conv2d(ch, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, h, w) patch scores."""
        return self.net(x)


def discriminator_layers(height: int, width: int) -> int:
    """PatchGAN depth that keeps a patch grid of a few cells: 2 for 28-32 px, 3 from 64 px up."""
    side = min(height, width)
    return 2 if side < 64 else 3


class ImagePool:
    """The history buffer of Shrivastava et al.: half the time the discriminator sees an older fake."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = rng

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        """Return a batch mixing ``batch`` with stored older images (and store the new ones)."""
        if self.size == 0:
            return batch
        out = []
        for img in batch.detach():
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif self.rng.random() < 0.5:
                j = self.rng.randrange(self.size)
                out.append(self.images[j])
                self.images[j] = img
            else:
                out.append(img)
        return torch.stack(out)


def to_gan(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1]."""
    return torch.from_numpy(images).to(device).float().div_(127.5).sub_(1.0)


def from_gan(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> uint8 (N, C, H, W)."""
    return ((x.detach().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()


@dataclass
class CycleGANResult:
    """The best generator found and the training history."""

    generator: ResnetGenerator
    best_epoch: int
    best_score: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


@torch.no_grad()
def translate(
    generator: nn.Module, images: np.ndarray, batch_size: int = 256, device: torch.device | None = None
) -> np.ndarray:
    """G(images): uint8 (N, C, H, W) in, uint8 out."""
    device = device or next(generator.parameters()).device
    generator.eval()
    out = [from_gan(generator(to_gan(images[i : i + batch_size], device))) for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else images.copy()


def _lr_lambda(cfg: CycleGANConfig) -> Callable[[int], float]:
    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - cfg.epochs) / float(cfg.epochs_decay + 1)

    return factor


_STATE_KEYS = ("g_uv", "g_vu", "d_u", "d_v", "opt_g", "opt_d", "sched_g", "sched_d")


def _step(
    nets: tuple[nn.Module, nn.Module, nn.Module, nn.Module],
    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    pools: tuple[ImagePool, ImagePool],
    real_u: torch.Tensor,
    real_v: torch.Tensor,
    cfg: CycleGANConfig,
    device: torch.device,
) -> tuple[float, float, float]:
    """One optimisation step of both generators, then both discriminators; returns (loss_g, loss_d, cycle)."""
    g_uv, g_vu, d_u, d_v = nets
    opt_g, opt_d = opts
    pool_u, pool_v = pools
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    # Generators: fool both discriminators, reconstruct both ways, keep identity.
    fake_v, fake_u = g_uv(real_u), g_vu(real_v)
    pred_fv, pred_fu = d_v(fake_v), d_u(fake_u)
    loss_gan = mse(pred_fv, torch.ones_like(pred_fv)) + mse(pred_fu, torch.ones_like(pred_fu))
    loss_cyc = l1(g_vu(fake_v), real_u) + l1(g_uv(fake_u), real_v)
    loss_g = loss_gan + cfg.lambda_cycle * loss_cyc
    if cfg.identity > 0:
        loss_id = l1(g_uv(real_v), real_v) + l1(g_vu(real_u), real_u)
        loss_g = loss_g + cfg.lambda_cycle * cfg.identity * loss_id
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    # Discriminators: real vs (pooled) fake, halved as in the reference.
    loss_d = torch.zeros((), device=device)
    for disc, real, fake, pool in ((d_v, real_v, fake_v, pool_v), (d_u, real_u, fake_u, pool_u)):
        p_real, p_fake = disc(real), disc(pool.query(fake.detach()))
        loss_d = loss_d + 0.5 * (mse(p_real, torch.ones_like(p_real)) + mse(p_fake, torch.zeros_like(p_fake)))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    return loss_g.item(), loss_d.item(), loss_cyc.item()


def _plateaued(cfg: CycleGANConfig, epoch: int, best_epoch: int) -> bool:
    """Early stop after ``epoch``: ``cfg.patience`` epochs without a better score, past ``cfg.min_epochs``."""
    return bool(cfg.patience) and epoch + 1 >= cfg.min_epochs and epoch - best_epoch >= cfg.patience


def _restore(state: dict[str, Any], nets: tuple[nn.Module, ...], optim: tuple[Any, ...]) -> None:
    """Load a checkpoint's networks, optimisers and schedulers (resume)."""
    for obj, key in zip((*nets, *optim), _STATE_KEYS, strict=True):
        obj.load_state_dict(state[key])


def _save(path: Path, nets: tuple[nn.Module, ...], optim: tuple[Any, ...], progress: dict[str, Any]) -> None:
    """The whole training state, written atomically (temp file + rename): what :func:`_restore` reads."""
    state = {key: obj.state_dict() for key, obj in zip(_STATE_KEYS, (*nets, *optim), strict=True)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, **progress}, tmp)
    tmp.replace(path)


def train_cyclegan(
    clean: np.ndarray,
    quarantine: np.ndarray,
    cfg: CycleGANConfig,
    score: Score | None = None,
    probe: np.ndarray | None = None,
    checkpoint: Path | None = None,
    quiet: bool = False,
    device: torch.device | None = None,
) -> CycleGANResult:
    """Fit G: U -> V and F: V -> U on uint8 ``clean`` (U) and ``quarantine`` (V) images (N, C, H, W).

    After every epoch ``score(G(probe))`` is logged; the best generator is kept. With ``checkpoint`` the
    full state is saved after every epoch and training resumes from it when the file exists.
    """
    if clean.shape[1:] != quarantine.shape[1:]:
        raise ValueError(f"clean images {clean.shape[1:]} and quarantine {quarantine.shape[1:]} differ in shape")
    if len(clean) == 0 or len(quarantine) == 0:
        raise ValueError("the CycleGAN needs at least one image in each domain")
    device = device or default_device()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    c, h, w = clean.shape[1:]
    g_uv = ResnetGenerator(c, cfg.width, cfg.blocks).to(device)
    g_vu = ResnetGenerator(c, cfg.width, cfg.blocks).to(device)
    n_layers = discriminator_layers(h, w)
    d_u = PatchDiscriminator(c, cfg.width, n_layers).to(device)
    d_v = PatchDiscriminator(c, cfg.width, n_layers).to(device)
    opt_g = torch.optim.Adam(list(g_uv.parameters()) + list(g_vu.parameters()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(list(d_u.parameters()) + list(d_v.parameters()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    total_epochs = cfg.epochs + cfg.epochs_decay
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_lambda(cfg))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _lr_lambda(cfg))
    pool_u, pool_v = (
        ImagePool(cfg.pool_size, random.Random(cfg.seed)),
        ImagePool(cfg.pool_size, random.Random(cfg.seed + 1)),
    )
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_score: float | None = None
    best_epoch = -1
    start_epoch = 0
    stopped_early = False
    fingerprint = hashlib.sha256(clean.tobytes() + quarantine.tobytes()).hexdigest()
    state = None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("config") != cfg.to_dict() or state.get("data") != fingerprint:
            log.warning("%s was trained with another config or data; starting afresh", checkpoint)
            state = None
    if state is not None:
        _restore(state, (g_uv, g_vu, d_u, d_v), (opt_g, opt_d, sched_g, sched_d))
        history, best_epoch, start_epoch = state["history"], int(state["best_epoch"]), int(state["epoch"]) + 1
        best_score, best_state = state["best_score"], state["best_g_uv"]
        rng = np.random.default_rng([cfg.seed, start_epoch])
        log.info("resumed CycleGAN from %s at epoch %d", checkpoint, start_epoch)
        # a fit that stopped early is finished: resuming it must not train on (and may pick another generator)
        stopped_early = score is not None and _plateaued(cfg, start_epoch - 1, best_epoch)

    u_all, v_all = to_gan(clean, device), to_gan(quarantine, device)
    steps = max(1, int(np.ceil(max(len(clean), len(quarantine)) / cfg.batch_size)))
    t0 = time.monotonic()
    bar = tqdm(total=total_epochs, initial=start_epoch, desc="cyclegan", disable=quiet, unit="epoch")
    for epoch in range(start_epoch, start_epoch if stopped_early else total_epochs):
        g_uv.train(), g_vu.train(), d_u.train(), d_v.train()
        sums = {"loss_g": 0.0, "loss_d": 0.0, "cycle": 0.0}
        order_u = rng.permutation(len(clean))
        for step in range(steps):
            iu = order_u[(np.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size)) % len(clean)]
            iv = rng.integers(0, len(quarantine), cfg.batch_size)
            losses = _step((g_uv, g_vu, d_u, d_v), (opt_g, opt_d), (pool_u, pool_v), u_all[iu], v_all[iv], cfg, device)
            for key, value in zip(("loss_g", "loss_d", "cycle"), losses, strict=True):
                sums[key] += value
        sched_g.step()
        sched_d.step()
        entry = {"epoch": float(epoch), **{k: v / steps for k, v in sums.items()}}
        if score is not None:
            entry["score"] = float(score(translate(g_uv, probe if probe is not None else clean, device=device)))
            if best_score is None or entry["score"] > best_score:
                best_score, best_epoch = entry["score"], epoch
                best_state = {k: v.detach().clone() for k, v in g_uv.state_dict().items()}
        else:
            best_epoch, best_state = epoch, {k: v.detach().clone() for k, v in g_uv.state_dict().items()}
        history.append(entry)
        bar.update(1)
        bar.set_postfix(
            loss_g=f"{entry['loss_g']:.3f}",
            loss_d=f"{entry['loss_d']:.3f}",
            score=f"{entry.get('score', float('nan')):.3f}",
        )
        # Without a bar (quiet: a repair job's log), each epoch is a log line: the job's progress.
        log.log(
            logging.INFO if quiet else logging.DEBUG,
            "cyclegan epoch %d/%d: loss_g %.3f loss_d %.3f score %.3f",
            epoch + 1, total_epochs, entry["loss_g"], entry["loss_d"], entry.get("score", float("nan")),
        )  # fmt: skip
        if checkpoint is not None:
            progress = {"history": history, "epoch": epoch, "best_epoch": best_epoch, "best_score": best_score,
                        "best_g_uv": best_state, "config": cfg.to_dict(), "data": fingerprint}  # fmt: skip
            _save(checkpoint, (g_uv, g_vu, d_u, d_v), (opt_g, opt_d, sched_g, sched_d), progress)
        if score is not None and _plateaued(cfg, epoch, best_epoch):
            stopped_early = True
            log.info(
                "CycleGAN score plateaued (best %.4f at epoch %d); stopping at epoch %d", best_score, best_epoch, epoch
            )
            break
    bar.close()
    assert best_state is not None
    g_uv.load_state_dict(best_state)
    g_uv.eval()
    return CycleGANResult(g_uv, best_epoch, best_score, history, time.monotonic() - t0, stopped_early)


def save_sample_grid(path: Path, clean: np.ndarray, generated: np.ndarray, n: int = 10, zoom: int = 3) -> None:
    """PNG: clean inputs in the top row, G(clean) below (the paper's Fig. 9)."""
    from PIL import Image

    n = min(n, len(clean))
    rows = [np.concatenate(list(batch[:n]), axis=2) for batch in (clean, generated)]  # (C, H, n*W) each
    grid = np.concatenate([rows[0], np.full_like(rows[0][:, :2], 128), rows[1]], axis=1)  # 2-px separator
    img = grid[0] if grid.shape[0] == 1 else grid.transpose(1, 2, 0)
    pil = Image.fromarray(img)
    pil.resize((pil.width * zoom, pil.height * zoom), Image.Resampling.NEAREST).save(path)
