"""An independent float64 computation of the official formulas (DESIGN.md §1).

Written from the formulas, straight from a state dict, in the official code's style
(grid_sample lookups, per-neighbour loops), sharing no code with lmf_cli's models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def coords(n: int) -> torch.Tensor:
    """Pixel centres as the official utils.make_coord gives them: v0 + r + (2r) * arange(n) in
    float32. Exact centres differ by rounding, which decides whether a query on a latent
    centre collapses the ensemble weights (x3, x5, ...)."""
    r = 1 / n
    return (-1 + r + (2 * r) * torch.arange(n).float()).double()


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


def diif_predict(sd: dict, args: dict, inp: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """DIIF (He et al., arXiv 2306.12321) as the authors' C2F-MLP computes it, one output
    pixel at a time (its slice's head recomputed per pixel), in float64, in [0, 1].

    Each output pixel belongs to the LR pixel (cell) holding its centre. Its slice: its own
    output row of the cell (or the whole cell with `single_slice`), with borders = the
    coordinates of the slice's first and last pixel relative to the cell centre (LR units).
    Head, per corner (vh, vw): [2x2 block of the 3x3 unfolded feature on that side, cell,
    start - (vh, vw), end - (vh, vw)]; tail: [area-weighted mix of the 4 head outputs, y, x].
    """
    sd = {k: v.double() for k, v in sd.items()}
    x = inp.double() * 2 - 1
    h, w = x.shape[-2:]
    big_h, big_w = out_hw
    feat = edsr(sd, x)
    c = feat.shape[1]
    unfolded = F.unfold(feat, 3, padding=1).view(c, 3, 3, h, w)
    ensemble = args.get("local_ensemble", True)

    def axis(n_in: int, n_out: int):
        j = torch.arange(n_out)
        owner = ((2 * j + 1) * n_in) // (2 * n_out)  # the LR pixel holding the output centre
        rel = ((2 * j + 1) * n_in - (2 * owner + 1) * n_out).double() / n_out
        first = torch.full((n_in,), math.inf, dtype=torch.float64).scatter_reduce(0, owner, rel, "amin")
        last = torch.full((n_in,), -math.inf, dtype=torch.float64).scatter_reduce(0, owner, rel, "amax")
        return owner, rel, first[owner], last[owner]

    oy, ry, fy, ly = (t[:, None].expand(big_h, big_w).reshape(-1) for t in axis(h, big_h))
    ox, rx, fx, lx = (t[None, :].expand(big_h, big_w).reshape(-1) for t in axis(w, big_w))
    if args.get("single_slice", False):
        start, end = torch.stack([fy, fx], -1), torch.stack([ly, lx], -1)
    else:
        start, end = torch.stack([ry, fx], -1), torch.stack([ry, lx], -1)
    scale = [big_h / h, big_w / w]
    clip = [max(s / 4, 1) for s in scale] if args.get("fixed_area", True) else [1, 1]
    cell = torch.tensor([2 * h / big_h * clip[0], 2 * w / big_w * clip[1]], dtype=torch.float64)
    cell = cell.expand(big_h * big_w, 2)
    coarse_cell = [cell] if args.get("coarse_cell_decode", True) else []
    fine_cell = [cell] if args.get("fine_cell_decode", False) else []

    def head(t: torch.Tensor) -> torch.Tensor:
        idx = sorted(int(k.split(".")[2]) for k in sd if k.startswith("imnet.layers.") and k.endswith(".weight"))
        for i in idx:
            t = torch.relu(F.linear(t, sd[f"imnet.layers.{i}.weight"], sd[f"imnet.layers.{i}.bias"]))
        return t

    def tail(t: torch.Tensor) -> torch.Tensor:
        idx = sorted(int(k.split(".")[2]) for k in sd if k.startswith("imnet.tail.") and k.endswith(".weight"))
        for n, i in enumerate(idx):
            t = F.linear(t, sd[f"imnet.tail.{i}.weight"], sd[f"imnet.tail.{i}.bias"])
            if n < len(idx) - 1:
                t = torch.relu(t)
        return t

    rel = torch.stack([ry, rx], -1)
    if not ensemble:
        f = unfolded[:, :, :, oy, ox].reshape(c * 9, -1).t()
        v = head(torch.cat([f, *coarse_cell, start, end], -1))
    else:
        vs, areas = [], []
        for vh in (-1, 1):
            for vw in (-1, 1):
                h0, w0 = (vh + 1) // 2, (vw + 1) // 2  # rows/cols (0, 1) or (1, 2) of the 3x3
                block = unfolded[:, h0:h0 + 2, w0:w0 + 2][:, :, :, oy, ox].reshape(c * 4, -1).t()
                shift = torch.tensor([vh, vw], dtype=torch.float64)
                vs.append(head(torch.cat([block, *coarse_cell, start - shift, end - shift], -1)))
                areas.append(((rel[:, 0] - vh) * (rel[:, 1] - vw)).abs() + 1e-9)
        total = sum(areas)
        areas = areas[::-1]  # each corner takes the area of the rectangle to the opposite one
        v = sum(vec * (a / total).unsqueeze(-1) for vec, a in zip(vs, areas, strict=True))
    out = tail(torch.cat([v, rel, *fine_cell], -1))
    if args.get("bilinear_skip"):
        out = out + sample(x, grid(big_h, big_w).view(-1, 2), mode="bilinear")
    return ((out + 1) / 2).clamp(0, 1).view(big_h, big_w, 3)
