"""The conditioning of the paired [uncond; cond] model call, as one object.

Every method calls the denoiser on both branches at once: latents [x; x] (2B, ...) with the unconditional rows
first, as diffusers' pipelines batch classifier-free guidance. A Conditioning holds one row per generation and
branch: `cond` (B, L, D) and `uncond` (B, L, D) text embeddings, plus `added`, the family's extra conditions
(e.g. SDXL's pooled text embeddings and time ids), each a pair (uncond rows, cond rows). Callers never stack
the branches by hand; a model family's profile builds these from prompts (utils.models.families).
"""
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Both branches' conditions for B generations. cond, uncond: (B, L, D); added: {name: (uncond (B, ...),
    cond (B, ...))}, passed to the model as `added_cond_kwargs` of the stacked rows."""
    cond: torch.Tensor
    uncond: torch.Tensor
    added: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, cond, uncond, n=1, added=None):
        """K prompts with n generations each: rows [c_1 x n, ..., c_K x n], the unconditional row (1, ...) shared.

        cond (K, L, D), uncond (1, L, D); added: {name: (uncond (1, ...), cond (K, ...))} or None."""
        k = cond.shape[0]
        extra = {name: (u.expand(k * n, *u.shape[1:]), c.repeat_interleave(n, dim=0))
                 for name, (u, c) in (added or {}).items()}
        return cls(cond.repeat_interleave(n, dim=0), uncond.expand(k * n, -1, -1), extra)

    @classmethod
    def cat(cls, parts):
        """The rows of several conditionings, in order."""
        names = parts[0].added.keys()
        return cls(torch.cat([p.cond for p in parts]), torch.cat([p.uncond for p in parts]),
                   {k: (torch.cat([p.added[k][0] for p in parts]), torch.cat([p.added[k][1] for p in parts]))
                    for k in names})

    def expand(self, n):
        """A one-row conditioning as n rows (views, as torch's expand: gradients sum over the n rows)."""
        if len(self) != 1:
            raise ValueError(f"expand needs one row, got {len(self)}")
        return self.map(lambda t: t.expand(n, *t.shape[1:]))

    def repeat_each(self, n):
        """Each row n times in a row: K rows -> K*n (a prompt's n generations)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def __len__(self):
        return self.cond.shape[0]

    @property
    def dtype(self):
        return self.cond.dtype

    def rows(self, index):
        """The generations `index` (a slice, list or tensor of row indices)."""
        return Conditioning(self.cond[index], self.uncond[index],
                            {k: (u[index], c[index]) for k, (u, c) in self.added.items()})

    def map(self, fn):
        """fn applied to every tensor (e.g. a dtype cast or detach)."""
        return Conditioning(fn(self.cond), fn(self.uncond), {k: (fn(u), fn(c)) for k, (u, c) in self.added.items()})

    def to(self, dtype):
        return self.map(lambda t: t.to(dtype))

    def detach(self):
        return self.map(lambda t: t.detach())

    def stacked(self):
        """Keyword arguments of the stacked call [uncond; cond] (2B rows): encoder_hidden_states, and
        added_cond_kwargs when the family has extra conditions."""
        kwargs = dict(encoder_hidden_states=torch.cat([self.uncond, self.cond]))
        if self.added:
            kwargs["added_cond_kwargs"] = {k: torch.cat([u, c]) for k, (u, c) in self.added.items()}
        return kwargs

    def stacked_as(self, branches):
        """Keyword arguments of a call whose row blocks are these branches in order, each B rows, e.g.
        ('uncond', 'cond', 'cond') for GUARD's [uncond; attracting; repelling] call (3B rows)."""
        pick = [0 if b == "uncond" else 1 for b in branches]
        kwargs = dict(encoder_hidden_states=torch.cat([(self.uncond, self.cond)[i] for i in pick]))
        if self.added:
            kwargs["added_cond_kwargs"] = {k: torch.cat([v[i] for i in pick]) for k, v in self.added.items()}
        return kwargs

    def branch(self, which):
        """Keyword arguments of a one-branch call on B rows: which = 'cond' or 'uncond'."""
        pick = 1 if which == "cond" else 0
        kwargs = dict(encoder_hidden_states=self.cond if pick else self.uncond)
        if self.added:
            kwargs["added_cond_kwargs"] = {k: v[pick] for k, v in self.added.items()}
        return kwargs

