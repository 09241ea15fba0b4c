"""Integer codes back from a simulated-quantized weight, exactly: what an exporter packs.

The workbench keeps quantized weights dequantized in float (``workbench/techniques/_quant.py``). An export
needs the integers and per-group parameters that reproduce those floats **bit for bit**, in one of three forms
(a group is ``group_size`` consecutive input weights of one output row):

- ``symmetric``  w = q · d,        q in [-2^(b-1), 2^(b-1) - 1]   (GGUF Q4_0/Q5_0/Q8_0; compressed-tensors sym)
- ``float_min``  w = q · d + m,    q in [0, 2^b - 1]              (GGUF Q4_1/Q5_1), computed as fl(fl(q·d) + m)
- ``int_zero``   w = (q - z) · d,  q, z in [0, 2^b - 1]           (GPTQ/AWQ checkpoints; compressed-tensors asym)

with d and m fp16 values (what the formats store). The codes are recovered from the floats alone, so they hold
for RTN, GPTQ and AWQ alike (GPTQ's error feedback means a group's extreme weight need not sit on an extreme
code, so the scale is searched among the candidates the group's values allow, not assumed). Any (q, d, m)
that reproduces the floats exactly is a correct export; the search prefers the one the workbench's own
quantizer would have chosen. A weight that has no exact form returns None; callers then name the closest
form and what converting would cost, never silently re-quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMS = ("symmetric", "float_min", "int_zero")


@dataclass
class Codes:
    """Exact integer form of a (out, in) weight: ``dequantize()`` equals the weight bit for bit."""

    form: str
    bits: int
    group_size: int
    q: torch.Tensor  # (out, in) int16 codes, in the form's range
    scale: torch.Tensor  # (out, in // group_size) float32, fp16-representable
    zero: (
        torch.Tensor | None
    )  # float_min: (out, G) float32 minimums; int_zero: (out, G) int16; symmetric: None

    def dequantize(self) -> torch.Tensor:
        """The float weight, computed as the workbench's quantizer computes it (float32)."""
        out_f, in_f = self.q.shape
        g = self.group_size
        q = self.q.float().view(out_f, in_f // g, g)
        d = self.scale[..., None]
        if self.form == "symmetric":
            w = q * d
        elif self.form == "float_min":
            assert self.zero is not None
            w = (q * d) + self.zero[..., None]
        else:
            assert self.zero is not None
            w = (q - self.zero.float()[..., None]) * d
        return w.view(out_f, in_f)


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Elementwise: the value is exactly an fp16 number (finite)."""
    h = t.to(torch.float16)
    return torch.isfinite(h) & (h.float() == t)


def _search(
    w: torch.Tensor, candidates: list[torch.Tensor], fit: callable
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Try per-group candidate scales in order, each only on the groups still unresolved.

    ``w`` is (N, g); each candidate a (N, 1) scale; ``fit(w_sub, d_sub)`` returns (ok (n,), q (n, g), zero (n, 1)).
    Returns (q, d, zero, ok) for all N groups, or None when some group fits no candidate.
    """
    n = w.shape[0]
    q_all = torch.zeros_like(w, dtype=torch.int16)
    d_all = torch.zeros(n, 1)
    z_all = torch.zeros(n, 1)
    todo = torch.arange(n)
    for cand in candidates:
        if todo.numel() == 0:
            break
        d = cand[todo]
        usable = _fp16_exact(d).squeeze(1) & (d.squeeze(1) != 0)
        if not usable.any():
            continue
        idx = todo[usable]
        ok, q, z = fit(w[idx], d[usable])
        done = idx[ok]
        q_all[done] = q[ok].to(torch.int16)
        d_all[done] = d[usable][ok]
        z_all[done] = z[ok]
        keep = torch.ones(n, dtype=torch.bool)
        keep[done] = False
        todo = todo[keep[todo]]
    if todo.numel():
        return None
    return q_all, d_all, z_all, torch.ones(n, dtype=torch.bool)


def recover_codes(weight: torch.Tensor, bits: int, group_size: int, form: str) -> Codes | None:
    """The exact integer form of ``weight`` (out, in) at ``bits`` and ``group_size`` (-1: the whole row), or None.

    Raises ValueError for a form not in :data:`FORMS`, a group size that does not divide the width, or bits
    outside 2..8.
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r}; choose one of {', '.join(FORMS)}.")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}; choose 2 to 8.")
    w2 = weight.detach().float().cpu()
    if w2.dim() != 2:
        raise ValueError(f"recover_codes takes a (out, in) weight, not shape {tuple(w2.shape)}.")
    out_f, in_f = w2.shape
    g = in_f if group_size == -1 else group_size
    if g <= 0 or in_f % g:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_f}.")
    if not torch.isfinite(w2).all():
        return None
    w = w2.reshape(-1, g)  # (N, g) groups
    n_groups = in_f // g
    if w.shape[0] > 256 and _find(w[:256], bits, form) is None:
        return None  # a weight off the grid shows it in its first groups: no full search (grid detection)
    found = _find(w, bits, form)
    if found is None:
        return None
    q, d, z = found
    zero = None
    if form == "float_min":
        zero = z.view(out_f, n_groups)
    elif form == "int_zero":
        zero = z.view(out_f, n_groups).to(torch.int16)
    codes = Codes(form, bits, g, q.view(out_f, in_f), d.view(out_f, n_groups), zero)
    if not torch.equal(codes.dequantize(), w2):  # the search checks each group; this guards the whole
        return None
    return codes


def _find(w: torch.Tensor, bits: int, form: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if form == "symmetric":
        return _symmetric(w, bits)
    if form == "float_min":
        return _float_min(w, bits)
    return _int_zero(w, bits)


def _symmetric(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    half = 2 ** (bits - 1)
    amax_idx = w.abs().argmax(-1, keepdim=True)
    vmax = w.gather(-1, amax_idx)  # the signed value of largest magnitude, (N, 1)
    zero_groups = vmax == 0

    def fit(ws: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.round(ws / d)
        ok = ((q >= -half) & (q <= half - 1) & (q * d == ws)).all(-1)
        return ok, q, torch.zeros_like(d)

    # The workbench's choice first (the extreme value on code -half, llama.cpp's Q*_0 rule), then every other
    # code the extreme value could sit on, either sign.
    codes = [-half] + [c for k in range(half - 1, 0, -1) for c in (-k, k)] + [half]
    candidates = [torch.where(zero_groups, torch.ones_like(vmax), vmax / c) for c in codes if c < half]
    found = _search(w, candidates, fit)
    if found is None:
        return None
    q, d, z, _ = found
    return q, d, z


def _float_min(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    qmax = 2**bits - 1
    vmin = w.amin(-1, keepdim=True)
    vmax = w.amax(-1, keepdim=True)
    span = vmax - vmin
    flat = span == 0

    def fit_with(m: torch.Tensor) -> callable:
        def fit(ws: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            mm = m[: ws.shape[0]]
            q = torch.round((ws - mm) / d)
            ok = ((q >= 0) & (q <= qmax) & (((q * d) + mm) == ws)).all(-1) & _fp16_exact(mm).squeeze(1)
            return ok, q, mm

        return fit

    # The group minimum on code 0 (how the workbench's quantizer and llama.cpp's Q*_1 place it); the maximum
    # on code qmax first, then lower codes (GPTQ's updates can leave the top code unused).
    n = w.shape[0]
    q_all = torch.zeros_like(w, dtype=torch.int16)
    d_all = torch.zeros(n, 1)
    m_all = vmin.clone()
    todo = torch.arange(n)
    for top in range(qmax, 0, -1):
        if todo.numel() == 0:
            break
        d = torch.where(flat[todo], torch.ones_like(span[todo]), (span[todo] / top).to(torch.float16).float())
        usable = _fp16_exact(d).squeeze(1) & (d.squeeze(1) > 0)
        idx = todo[usable]
        if idx.numel() == 0:
            continue
        ok, q, _ = fit_with(vmin[idx])(w[idx], d[usable])
        done = idx[ok]
        q_all[done] = q[ok].to(torch.int16)
        d_all[done] = d[usable][ok]
        keep = torch.ones(n, dtype=torch.bool)
        keep[done] = False
        todo = todo[keep[todo]]
    if todo.numel():
        return None
    return q_all, d_all, m_all


def _int_zero(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    qmax = 2**bits - 1
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    span = hi - lo
    amax = w.abs().amax(-1, keepdim=True)
    empty = amax == 0

    def fit(ws: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = torch.round(ws / d)  # q - z
        kmin = k.amin(-1, keepdim=True).clamp(max=0)
        kmax = k.amax(-1, keepdim=True).clamp(min=0)
        z = -kmin  # the smallest zero point that keeps every code >= 0
        ok = ((k * d == ws).all(-1)) & ((kmax - kmin) <= qmax).squeeze(1)
        return ok, (k + z), z

    # The workbench's choice first (range widened to include 0, split into qmax steps), then the scales that
    # put the largest magnitude on each possible code.
    candidates = [torch.where(empty, torch.ones_like(span), span / qmax)]
    candidates += [torch.where(empty, torch.ones_like(amax), amax / c) for c in range(qmax, 0, -1)]
    found = _search(w, candidates, fit)
    if found is None:
        return None
    q, d, z, _ = found
    return q, d, z


__all__ = ["FORMS", "Codes", "recover_codes"]
