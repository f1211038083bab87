"""An independent float64 computation of the official formulas (DESIGN.md §1).

Written from the formulas, straight from a state dict, in the official code's style
(grid_sample lookups, per-neighbour loops), sharing no code with lmf_cli's models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def coords(n: int) -> torch.Tensor:
    return -1 + (2 * torch.arange(n, dtype=torch.float64) + 1) / n


def grid(h: int, w: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(coords(h), coords(w), indexing="ij"), -1)


def edsr(sd: dict, x: torch.Tensor, prefix: str = "encoder.") -> torch.Tensor:
    def conv(name, t):
        return F.conv2d(t, sd[prefix + name + ".weight"], sd[prefix + name + ".bias"], padding=1)

    x = conv("head.0", x)
    res = x
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith(prefix + "body.") and k.count(".body.") == 2})
    for i in range(n_blocks):
        res = res + conv(f"body.{i}.body.2", torch.relu(conv(f"body.{i}.body.0", res)))
    return conv(f"body.{n_blocks}", res) + x


def rdn(sd: dict, x: torch.Tensor, prefix: str = "encoder.") -> torch.Tensor:
    def conv(name, t, pad=1):
        return F.conv2d(t, sd[prefix + name + ".weight"], sd[prefix + name + ".bias"], padding=pad)

    f1 = conv("SFENet1", x)
    x = conv("SFENet2", f1)
    outs = []
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith(prefix + "RDBs.")})
    for i in range(n_blocks):
        n_convs = len({k.split(".")[4] for k in sd if k.startswith(prefix + f"RDBs.{i}.convs.")})
        t = x
        for c in range(n_convs):
            t = torch.cat([t, torch.relu(conv(f"RDBs.{i}.convs.{c}.conv.0", t))], 1)
        x = conv(f"RDBs.{i}.LFF", t, pad=0) + x
        outs.append(x)
    return conv("GFF.1", conv("GFF.0", torch.cat(outs, 1), pad=0)) + f1


def mlp(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    idx = sorted(int(k.split(".")[2]) for k in sd if k.startswith(prefix + "layers.") and k.endswith(".weight"))
    for j, i in enumerate(idx):
        x = F.linear(x, sd[f"{prefix}layers.{i}.weight"], sd[f"{prefix}layers.{i}.bias"])
        if j < len(idx) - 1:
            x = torch.relu(x)
    return x


def modulated_mlp(sd: dict, x: torch.Tensor, mod: torch.Tensor, width: int) -> torch.Tensor:
    idx = sorted(int(k.split(".")[2]) for k in sd if k.startswith("imnet.layers.") and k.endswith(".weight"))
    depth = len(idx) - 1
    for j, i in enumerate(idx):
        x = F.linear(x, sd[f"imnet.layers.{i}.weight"], sd[f"imnet.layers.{i}.bias"])
        if j < depth:
            scale = mod[..., j * width:(j + 1) * width]
            shift = mod[..., (depth + j) * width:(depth + j + 1) * width]
            x = torch.relu(x * (1 + scale) + shift)
    return x


def sample(t: torch.Tensor, c: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """t (1, C, h, w) at coords c (Q, 2) -> (Q, C)."""
    g = c.flip(-1).view(1, 1, -1, 2)
    return F.grid_sample(t, g, mode=mode, padding_mode="border", align_corners=False)[0, :, 0].t()


def predict(name: str, sd: dict, args: dict, inp: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Official-style prediction of a whole (out_h, out_w) image, in [0, 1], float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = inp.double() * 2 - 1
    h, w = x.shape[-2:]
    big_h, big_w = out_hw
    enc_name = args["encoder_spec"]["name"]
    feat = rdn(sd, x) if enc_name == "rdn" else edsr(sd, x)
    coord = grid(big_h, big_w).view(-1, 2)
    clip = [max(big_h / h / 4, 1), max(big_w / w / 4, 1)]
    cell = torch.tensor([2 / big_h * clip[0], 2 / big_w * clip[1]], dtype=torch.float64)
    rel_cell = cell * torch.tensor([h, w], dtype=torch.float64)
    feat_coord = grid(h, w).permute(2, 0, 1)[None]

    if name in ("liif", "lmliif"):
        unfolded = F.unfold(feat, 3, padding=1).view(1, -1, h, w)
    if name == "lmliif":
        hyper_in = torch.cat([unfolded[0].permute(1, 2, 0), rel_cell.expand(h, w, 2)], -1)
        latent = mlp(sd, "hypernet.", hyper_in).permute(2, 0, 1)[None]
    if name in ("lte", "lmlte"):
        coef = F.conv2d(feat, sd["coef.weight"], sd["coef.bias"], padding=1)
        freq = F.conv2d(feat, sd["freq.weight"], sd["freq.bias"], padding=1)
    if name == "lmlte":
        fq = freq[0].permute(1, 2, 0)
        fq = torch.stack(torch.split(fq, 2, dim=-1), -1).sum(-2) + F.linear(rel_cell, sd["phase.weight"])
        hyper_in = coef[0].permute(1, 2, 0) * torch.cat([torch.cos(math.pi * fq), torch.sin(math.pi * fq)], -1)
        latent = mlp(sd, "hypernet.", hyper_in).permute(2, 0, 1)[None]

    preds, areas = [], []
    for vy in (-1, 1):
        for vx in (-1, 1):
            c = coord.clone()
            c[:, 0] += vy / h + 1e-6
            c[:, 1] += vx / w + 1e-6
            c = c.clamp(-1 + 1e-6, 1 - 1e-6)
            rel = (coord - sample(feat_coord, c)) * torch.tensor([h, w], dtype=torch.float64)
            if name == "liif":
                pred = mlp(sd, "imnet.", torch.cat([sample(unfolded, c), rel, rel_cell.expand_as(rel)], -1))
            elif name == "lmliif":
                m = sample(latent, c)
                width = sd["imnet.layers.0.weight"].shape[0]
                mod_dim = m.shape[-1] - width
                pred = modulated_mlp(sd, torch.cat([m[:, mod_dim:], rel, rel_cell.expand_as(rel)], -1),
                                     m[:, :mod_dim], width)
            elif name == "lte":
                q_coef, q_freq = sample(coef, c), sample(freq, c)
                z = torch.stack(torch.split(q_freq, 2, dim=-1), -1)
                z = (z * rel.unsqueeze(-1)).sum(-2) + F.linear(rel_cell, sd["phase.weight"])
                pred = mlp(sd, "imnet.", q_coef * torch.cat([torch.cos(math.pi * z), torch.sin(math.pi * z)], -1))
            else:
                m = sample(latent, c)
                width = sd["imnet.layers.0.weight"].shape[0]
                mod_dim = m.shape[-1] - 2 * width
                q_coef, q_freq = m[:, mod_dim:mod_dim + width], m[:, mod_dim + width:]
                z = torch.stack(torch.split(q_freq, 2, dim=-1), -1)
                z = (z * rel.unsqueeze(-1)).sum(-2) + F.linear(rel_cell, sd["imphase.weight"])
                feats = q_coef * torch.cat([torch.cos(math.pi * z), torch.sin(math.pi * z)], -1)
                pred = modulated_mlp(sd, feats, m[:, :mod_dim], width)
            preds.append(pred)
            areas.append((rel[:, 0] * rel[:, 1]).abs() + 1e-9)
    total = sum(areas)
    areas = areas[::-1]
    out = sum(p * (a / total).unsqueeze(-1) for p, a in zip(preds, areas, strict=True))
    if name in ("lte", "lmlte") or args.get("bilinear_skip"):
        out = out + sample(x, coord, mode="bilinear")
    return ((out + 1) / 2).clamp(0, 1).view(big_h, big_w, 3)
