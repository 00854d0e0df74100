"""RNA and RTA (Somepalli et al., 2023, as in Wen et al.'s code): random numbers / random tokens inserted in the
prompt. Both share one settings dataclass, hence one set of flags."""
import dataclasses

import numpy as np

from .base import Method, Plan, is_count, grid_count, hp, problems
from ..cli import nonneg_int, positive_int


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Random number (rna) / random token (rta) addition, as Wen et al.'s optim_utils (after Somepalli's DCR).

    count words are inserted one after another, each at a uniform gap of the space-split prompt (both ends
    included); a number is uniform in [0, 99999], a token is the decoded text of a uniform id in [0, vocab).
    """
    count: int = hp(4, type=nonneg_int)    # insertions (paper grid {1, 2, 4, 6, 8}; Wen's README RTA command: 4)
    per_image: bool = False                # a new draw for each image (their code: one shared by the n images)
    vocab: int = hp(49400, type=positive_int, flag="--rta_vocab")  # token ids from [0, this): CLIP's below BOS

    def __post_init__(self):
        problems([(is_count(self.count) and self.count >= 0, "count must be an integer >= 0"),
                  (isinstance(self.per_image, bool), "per_image must be true or false"),
                  (is_count(self.vocab) and self.vocab > 0, "vocab must be a positive integer")])

    def to_dict(self):
        return dataclasses.asdict(self)


def augmentation_rng(seed, index):
    """The generator of one prompt's insertions: seeded by (seed, prompt index) only."""
    return np.random.default_rng([int(seed), int(index)])


def insert_words(prompt, count, rng, draw):
    """prompt with `count` words from draw(rng) inserted one by one, each at a uniform gap of the space-split
    word list (len + 1 gaps: both ends included). Returns (new prompt, inserted words in order)."""
    words, added = prompt.split(" "), []
    for _ in range(count):
        pos = int(rng.integers(0, len(words) + 1))
        added.append(draw(rng))
        words.insert(pos, added[-1])
    return " ".join(words), added


def random_number(rng):
    return str(int(rng.integers(0, 100000)))


def augmented_prompts(prompt, index, seed, n, settings, draw):
    """The n per-image prompts of one prompt (one draw shared by all unless settings.per_image) and the words
    inserted into each: (list of n prompts, list of n lists of words)."""
    rng = augmentation_rng(seed, index)
    drawn = [insert_words(prompt, settings.count, rng, draw) for _ in range(n if settings.per_image else 1)]
    drawn = drawn if settings.per_image else drawn * n
    return [p for p, _ in drawn], [w for _, w in drawn]


def _plan_augment(ctx, index, prompt, settings, draw):
    n = ctx.noise.shape[0]
    prompts, inserted = augmented_prompts(prompt, index, ctx.seed, n, settings, draw)
    cond = ctx.encode(prompts if settings.per_image else prompts[:1])
    return Plan(ctx.noise, cond, ctx.guidance_scale, prompts, dict(inserted=inserted))


def plan_rna(ctx, index, prompt, settings):
    return _plan_augment(ctx, index, prompt, settings, random_number)


def plan_rta(ctx, index, prompt, settings):
    from ..models.clip import token_text
    return _plan_augment(ctx, index, prompt, settings,
                         lambda rng: token_text(ctx.tokenizer, int(rng.integers(0, settings.vocab))))


_COUNTS = [{"count": c} for c in (1, 2, 4, 6, 8)]
_TITLE = "rna / rta (Somepalli et al., as in Wen et al.'s code)"
RNA = Method("rna", AugmentSettings, plan_rna, "count", lambda x: {"count": grid_count(x)}, _COUNTS,
             lambda s: f"n={s['count']}", flag_prefix="aug_", title=_TITLE)
RTA = Method("rta", AugmentSettings, plan_rta, "count", lambda x: {"count": grid_count(x)}, _COUNTS,
             lambda s: f"n={s['count']}", flag_prefix="aug_", title=_TITLE)
