"""The fitted method (``EMLoCConfig(compression="fitted")``): the whole-context ranking chooses which
keys stay, then each kept slot's logit bias and value are *fitted* so that the memory answers the
reference queries as the full context does (attention matching, Zweiger, Fu, Guo and Kim 2026, "Fast KV
Compaction via Attention Matching", arXiv 2602.16284).

Per full-attention layer and KV head, with ``P`` the full context's attention of the reference queries
(``n`` rows over ``T`` tokens, each row summing to 1) and ``S`` the kept slots:

- **mass**: one weight ``w_s >= floor`` per kept slot so that ``P[:, S] @ w ~= 1``: the kept slots draw,
  for every query, the attention mass the whole context drew (non-negative least squares,
  ``mass_weights``). Stored as ``logit_bias = log w`` (``CompressedMemory.logit_bias``). Without it a
  query that also reads its own tokens (every real query does) would give them too much weight.
- **values**: ``V'`` minimising ``|P' V' - P V|^2 + ridge * |V' - V_S|^2``, with ``P'`` the biased
  attention over the kept slots (rows renormalised): the kept slots' output matches the full context's
  output. The ridge pulls a slot few queries see towards its own value instead of towards zero.

Mass and output matched together make the layer's attention over memory plus new tokens equal, for a
reference query, to its attention over the full context plus new tokens. The reference queries are the
post-RoPE queries of the forwards the ranking already runs (no forward of its own): the reconstruction
forward (the model repeating its context, ``FitOptions.queries`` "reconstruction") and the held-out
answers' rows (the validation demonstrations excluded, "held-out"), or both. Sliding-window layers and
layers kept whole are left as they are. The JS check then reads the fitted memory, so the share the
check keeps is the share the fit makes faithful.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from ..config import EMLoCConfig
from ..skills import Skill
from .chunk_loop import prefill
from .context import RankedContext, rank_context, require_text, search_shares
from .forward import ModelHandle, clock
from .memory import CompressedMemory
from .presses import Press

__all__ = ["FitOptions", "Fitted", "QueryBank", "Reference", "attention_output", "fit_head", "fit_memory",
           "mass_weights", "reference_queries", "references"]


class QueryBank:
    """Reference queries per layer, gathered from the ranking's own forwards: ``add`` keeps every
    ``stride``-th row of a forward's post-RoPE queries (1, Hq, L, d), already multiplied by the layer's
    attention scaling, as float32 rows, with the context span each row does not see (a held-out
    demonstration's own; (0, 0) where it sees the whole context)."""

    def __init__(self, stride: int = 1) -> None:
        self.stride = max(1, stride)
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.hidden: dict[int, list[torch.Tensor]] = {}

    def add(self, module: torch.nn.Module, layer: int, q: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        scaling = getattr(module, "scaling", q.shape[-1] ** -0.5)
        rows = (q[0, :, :: self.stride].float() * scaling).clone()
        self.rows.setdefault(layer, []).append(rows)
        spans = torch.zeros(rows.shape[1], 2, dtype=torch.long, device=q.device) if hidden is None \
            else hidden[:: self.stride].to(q.device, torch.long)
        self.hidden.setdefault(layer, []).append(spans)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows (Hq, n, d), hidden spans (n, 2)) of everything gathered for ``layer``, or None."""
        got = self.rows.get(layer)
        return None if not got else (torch.cat(got, dim=1), torch.cat(self.hidden[layer]))


def attention_output(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     bias: torch.Tensor | None = None, visible: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One KV head's attention of ``queries`` (n, d; scaled) over ``keys``/``values`` (m, d) with an
    optional per-slot logit ``bias`` (m,) and ``visible`` (n, m) bool: (output (n, d), log of the
    attention mass (n,)), float32."""
    logits = queries @ keys.float().T
    if bias is not None:
        logits = logits + bias
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    return torch.softmax(logits, dim=-1) @ values.float(), lse


def seen(hidden: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """(n, m) bool: which of the keys at ``positions`` (m,) each row sees, given its hidden span
    ``hidden`` (n, 2); None when nothing is hidden."""
    if hidden is None or not bool((hidden[:, 1] > hidden[:, 0]).any()):
        return None
    pos = positions[None, :]
    return (pos < hidden[:, :1]) | (pos >= hidden[:, 1:])


@dataclasses.dataclass
class Reference:
    """One KV head's reference queries (n, d; scaled) with what the full context gives them: the log of
    the attention mass (n,) and the attention output (n, d), each over the context the row sees
    (``hidden`` (n, 2): the span a held-out row does not see, as a test question never sees a copy of
    itself). Made once per head; every trial's fit then reads only its kept keys."""

    queries: torch.Tensor
    log_mass: torch.Tensor
    output: torch.Tensor
    hidden: torch.Tensor | None = None

    @classmethod
    def of(cls, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           hidden: torch.Tensor | None = None) -> Reference:
        visible = seen(hidden, torch.arange(keys.shape[0], device=keys.device))
        output, log_mass = attention_output(queries, keys, values, visible=visible)
        return cls(queries, log_mass, output, hidden if visible is not None else None)


def fit_head(ref: Reference, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor,
             ridge: float = 1e-3, weight_floor: float = 1e-3, iterations: int = 300,
             value_target: Literal["memory", "joint"] = "memory") -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one KV head: (logit bias (k,), values (k, d)) for the kept token indices ``kept`` (k,) of
    ``keys``/``values`` (T, d), to the reference ``ref``. See the module docstring."""
    # (n, k): each kept slot's part of every query's full attention mass (0 where the row does not see it)
    share = torch.exp(ref.queries @ keys[kept].float().T - ref.log_mass[:, None])
    visible = seen(ref.hidden, kept)
    if visible is not None:
        share = share * visible
    gram = share.T @ share
    w = mass_weights(share, weight_floor, iterations, gram)
    if value_target == "joint":  # share * w, unnormalised: its Gram is the mass fit's, scaled
        gram, rhs = gram * w[:, None] * w[None, :], w[:, None] * (share.T @ ref.output)
    else:
        fitted = share * w
        fitted = fitted / fitted.sum(1, keepdim=True).clamp_min(1e-30)  # (n, k): the kept slots' attention
        gram, rhs = fitted.T @ fitted, fitted.T @ ref.output
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    lhs = gram + lam * torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return w.log(), torch.linalg.solve(lhs, rhs + lam * values[kept].float())


def mass_weights(share: torch.Tensor, floor: float, iterations: int, gram: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``w >= floor`` minimising ``|share @ w - 1|^2`` (``share`` (n, k) >= 0: each kept slot's part of
    every query's full attention mass), by multiplicative updates ``w <- w * (A^T 1) / (A^T A w)`` (Lee
    and Seung): with a non-negative ``A`` the iterate stays positive, the loss never rises and the
    fixed points are the non-negative least-squares solutions; each step is one (k, k) product.
    Measured against a box-constrained least-squares start with projected-gradient steps (biases
    within +-3, Zweiger et al.'s setting): on Qwen2.5-Coder-0.5B TREC-128 at 20 % the box's
    validation JS was 0.024, this one's 0.0051 (docs/design.md, "Fitted memories")."""
    gram, rhs = share.T @ share if gram is None else gram, share.sum(0)
    w = torch.full((share.shape[1],), 1.0 / max(float(share.sum(1).mean()), 1e-12), device=share.device)
    for _ in range(iterations):
        w = (w * rhs / (gram @ w).clamp_min(1e-30)).clamp_min(floor)
    return w


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """What the fit reads and how it is regularised.

    ``queries``: the reference query set (``QueryBank`` sources). ``max_queries``: reference rows per
    layer and query head at most (the reconstruction forward is strided to fit; held-out rows all kept
    up to it). ``ridge``: the value fit's ridge, relative to the mean diagonal of its Gram matrix.
    ``weight_floor``: the smallest mass weight (a slot no reference query needs keeps a bias of
    log(floor), not -inf, so a query unlike the reference ones still sees it). ``iterations``:
    multiplicative updates of the mass fit. ``fit_values``: fit the values too (else the biases only).
    ``hide_own``: a held-out row is matched over the context it saw, its own demonstration hidden
    (else over the whole context, its own copy included). ``max_rows``: reference rows per KV head at
    most (strided over its query heads' rows; None: all): the fit's cost is about rows x kept slots^2.
    ``value_target``: "memory" fits the values so that the memory's own attention output (its rows
    renormalised) matches the full context's; "joint" so that the unnormalised output, the numerator
    of attention over memory and new tokens together, matches (then the mass fit's Gram serves the
    value fit too: one Gram per head instead of two). ``first_split``: at each share, keep the first
    split whose check passes instead of trying every split for the lowest JS (``best_split``'s
    ``first``): the fits at the share that passes are most of the fit's cost."""

    queries: Literal["reconstruction", "held-out", "both"] = "both"
    max_queries: int = 512
    ridge: float = 1e-3
    weight_floor: float = 1e-3
    iterations: int = 300
    fit_values: bool = True
    hide_own: bool = True
    max_rows: int | None = None
    value_target: Literal["memory", "joint"] = "memory"
    first_split: bool = False

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def references(lm: ModelHandle, full: CompressedMemory, queries: dict[int, tuple[torch.Tensor, torch.Tensor]],
               hide: bool = True, max_rows: int | None = None) -> dict[tuple[int, int], Reference]:
    """(layer, KV head) -> its ``Reference`` on the unpruned ``full`` memory, for every full-attention
    layer with ``queries`` (per layer: rows (Hq, n, d), scaled, and their hidden spans (n, 2), which
    ``hide=False`` ignores: every row then matched over the whole context); a KV head reads the rows of
    its query heads, every ``ceil(rows / max_rows)``-th of them with ``max_rows``."""
    f = lm.facts
    group = f.num_heads // f.num_kv_heads
    out = {}
    for layer, (q, hidden) in queries.items():
        if f.sliding[layer]:
            continue
        device = full.keys[layer].device
        spans = hidden.to(device).repeat(group, 1) if hide else None  # the group's query heads' rows, head by head
        for h in range(f.num_kv_heads):
            rows = q[h * group : (h + 1) * group].reshape(-1, q.shape[-1]).to(device)
            step = 1 if max_rows is None else max(1, math.ceil(rows.shape[0] / max_rows))
            out[layer, h] = Reference.of(rows[::step], full.keys[layer][h], full.values[layer][h],
                                         None if spans is None else spans[::step])
    return out


def fit_memory(full: CompressedMemory, kept: CompressedMemory, refs: dict[tuple[int, int], Reference],
               options: FitOptions = FitOptions()) -> CompressedMemory:
    """``kept`` (tokens of ``full``, the unpruned float32 memory) with every pruned layer's biases and
    values fitted to its ``references``. Layers kept whole and layers without references (sliding
    windows) stay as they are, with no bias."""
    values: list[torch.Tensor] = []
    biases: list[torch.Tensor | None] = []
    for layer, (k, v, pos) in enumerate(zip(kept.keys, kept.values, kept.positions, strict=True)):
        fk, fv = full.keys[layer], full.values[layer]
        if (layer, 0) not in refs or k.shape[-2] == fk.shape[-2]:
            values.append(v)
            biases.append(None)
            continue
        out = v.float().clone()
        bias = torch.zeros(k.shape[:2], dtype=torch.float32, device=v.device)
        for h in range(k.shape[0]):
            slots = (pos[h] >= 0).nonzero().squeeze(1)
            held = pos[h, slots].long()
            b, fitted = fit_head(refs[layer, h], fk[h], fv[h], held, options.ridge, options.weight_floor,
                                 options.iterations, options.value_target)
            bias[h, slots] = b
            if options.fit_values:
                out[h, slots] = fitted
        values.append(out.to(v.dtype))
        biases.append(bias)
    return dataclasses.replace(kept, values=values, logit_bias=biases)


@dataclasses.dataclass
class Fitted:
    """The fitted method's entry point (``METHODS["fitted"]``), one instance per set of options. Options
    are not part of a memory's registry key, only the method's name is: register another instance under
    another name (``register_method("fitted-ridge", Fitted(FitOptions(ridge=0.1)))``)."""

    options: FitOptions = dataclasses.field(default_factory=FitOptions)

    def __call__(self, lm: ModelHandle, skill: Skill, config: EMLoCConfig, press: Press | None = None,
                 progress: Callable[[int, int], None] | None = None) -> CompressedMemory:
        if press is not None:
            raise ValueError("compression='fitted' takes no press; a press runs the chunk-wise loop")
        require_text(lm, skill)
        full = prefill(lm, skill, config.prompt_format)
        opts = self.options
        stride = max(1, math.ceil(full.original_length / opts.max_queries))
        recon = QueryBank(stride) if opts.queries in ("reconstruction", "both") else None
        held = QueryBank(1) if opts.queries in ("held-out", "both") else None
        ranked = rank_context(lm, skill, config, full, None if progress is None else lambda s: progress(s, 3),
                              reconstruction_queries=recon, held_out_queries=held)
        t0 = clock(lm.device)
        refs = references(lm, full, reference_queries(lm, recon, held, most=opts.max_queries), opts.hide_own,
                          opts.max_rows)
        fit_s = [clock(lm.device) - t0]

        def shape(memory: CompressedMemory, ranked: RankedContext = ranked) -> CompressedMemory:
            t = clock(lm.device)
            fitted = fit_memory(ranked.full, memory, refs, opts)
            fit_s[0] += clock(lm.device) - t
            return fitted

        memory = search_shares(lm, ranked, config, shape, progress, method="fitted", options=opts.describe(),
                               first=opts.first_split)
        memory.stats["fit_s"] = fit_s[0]  # inside check_s: the references and every trial's fit
        return memory


def reference_queries(lm: ModelHandle, *banks: QueryBank | None, most: int = 512
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per full-attention layer (rows (Hq, n, d), hidden spans (n, 2)): the rows of every bank, each
    bank's strided to at most ``most`` rows."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(lm.facts.num_layers):
        rows, spans = [], []
        for bank in banks:
            got = None if bank is None else bank.layer(layer)
            if got is not None:
                step = max(1, math.ceil(got[0].shape[1] / most))
                rows.append(got[0][:, ::step])
                spans.append(got[1][::step])
        if rows:
            out[layer] = (torch.cat(rows, dim=1), torch.cat(spans))
    return out
