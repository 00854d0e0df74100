"""Demo CLIP: a tiny contrastive image-text model trained on the demo model's own training pairs.

It gives images of the demo world (coloured handwritten digits on a black 32x32 canvas) a prompt-alignment score
the way open_clip gives Stable Diffusion's images one: the cosine of the L2-normalized image and text embeddings
(utils.similarity.clip_scores, raw, no x100). `load_demo_clip()` returns (model, preprocess, tokenizer) with the
open_clip interface that clip_scores uses.

Model (about 70 k parameters, under 0.3 MB in float32, with the default sizes):
- image: a 4-layer CNN on the 32x32 RGB canvas in [-1, 1] (two 2x max-pools), then a global max-pool over positions
  and a linear map to the shared space. The 8x8 digit is seen at full resolution, and the global pool lets digit
  and colour features ignore where the digit sits (captions never name the position). With coords=True two
  coordinate channels (y, x in [-1, 1]) are appended to the input, so features can also carry the position: part of
  an image's identity, which the instance-level captions (generic, memorized, shared) are about.
- text: the real CLIP BPE tokenizer (utils.models.offline_clip_tokenizer, truncated at 77 tokens with start and end
  tokens, as Stable Diffusion splits a prompt), its token ids mapped to a compact vocabulary of the tokens seen in
  the training captions (id 0: padding, id 1: out-of-vocabulary, then the seen CLIP ids in increasing order), a
  token embedding mean-pooled over the non-padding tokens, and a 2-layer MLP to the shared space. Word order is
  ignored: a bag of words suffices for captions that name a digit and a colour.
- a learned temperature (CLIP's logit scale, initialized at 1/0.07, capped at 100).

Training pairs (utils.demo_data.build_dataset(seed, n_shared=30, generic=True): the committed demo model's recipe)
are the DISTINCT (image, caption) pairs of the training split: every image with each of its ten templated captions
and its one generic (web-like) caption, each memorized caption with its memorized image, and each shared pair.
Balance: batches are drawn uniformly over these distinct pairs, so the memorized pair counts once, like any other
pair, and not 300 times as in the diffusion model's training set. The score is meant to be a CLIP of the data
distribution, as LAION's CLIP is a CLIP of a web in which a few hundred duplicates are a negligible share; with
the duplicates counted, a third of all pairs would be the 32 memorized ones and the score would mostly measure
"is this the memorized image". A memorized caption is thus described by its 31 images (the memorized one and its
30 shared ones), roughly equally.

Loss: CLIP's symmetric cross-entropy over a batch, with multiple positives: caption j is a positive of image i when
(image i, caption j) is a training pair (many images share "the digit 3"); the target of each row (column) is
uniform over its positives, so a shared caption is not pushed away from the other images it truly describes.
Token dropout: each content token is replaced by the out-of-vocabulary id with a small probability, so the OOV
embedding is trained and prompts with unseen words still land somewhere learned. No image augmentation: the
digit's position and colour are part of the data (shifts and colour jitter would teach the model to ignore what
captions and copies are about), and horizontal flips turn digits into non-digits.

Held-out split: a seeded 10% of the images that are not memorized (memorized images always train: the score must
know the memorized pairs that mitigate_eval scores) are removed with all their pairs (templated, generic and shared)
before the vocabulary is built and before training. Metrics (evaluate()):
(a) caption retrieval: for each held-out image, every distinct templated caption of the held-out images is scored;
    top-1 correct when the best caption is one of the image's own ten (a caption true of the image, e.g. "the digit
    3" for any 3); chance = the mean over images of (own captions / all candidate captions).
(b) zero-shot classification: each held-out image against the 80 prompts "a {colour} handwritten {digit name}"
    (8 colours x 10 digits); the best prompt gives the predicted colour and digit; colour accuracy (chance 1/8),
    digit accuracy (chance 1/10) and both (chance 1/80). Also with the never-trained paraphrase "a picture of a
    {colour} handwritten {digit name}" (a held-out template of demo_data).
(c) memorized retrieval: for each of the 32 memorized captions, the 32 memorized training images are scored;
    correct when the best is the caption's own memorized image (chance 1/32). These are training pairs: this says
    how well the score knows the memorized associations, not how it generalizes.

What the score measures: for prompts made of the training captions' words (digit names, numerals, colours), whether
the image shows that digit in that colour; words it never saw are one out-of-vocabulary token, so an unrelated
prompt scores every digit image about alike. For a memorized caption it measures, weakly, likeness to the 31
images that caption describes; it is not a copy detector (pixel cosine to the training image is that measure).
The measured numbers are in demo_clip/train_log.json.
"""
import json
import math
import os

import numpy as np
import torch
from torch import nn

from ..cli import UserError
from ..models.loading import REPO_ROOT

DEFAULT_DIR = os.path.join(REPO_ROOT, "demo_clip")
REBUILD = "python3 train_demo_clip.py"
PAD, OOV = 0, 1
MAX_TOKENS = 77  # CLIP's context length, start and end tokens included (Stable Diffusion's truncation)
ZERO_SHOT = "a {c} handwritten {n}"  # a training template naming both colour and digit
ZERO_SHOT_UNSEEN = "a picture of a {c} handwritten {n}"  # demo_data.HELDOUT_TEMPLATES[0]: never trained on


# ----------------------------------------------------------------------------------------------- model and I/O

class DemoClip(nn.Module):
    """encode_image((B, 3, 32, 32) in [-1, 1]) -> (B, D); encode_text((B, L) compact token ids) -> (B, D).

    Embeddings are not normalized (as open_clip's, unless asked); clip_scores normalizes them.
    """

    def __init__(self, vocab_size, width=16, token_dim=64, embed_dim=64, coords=True):
        super().__init__()
        w = width
        self.coords = coords
        self.visual = nn.Sequential(
            nn.Conv2d(5 if coords else 3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, embed_dim))
        self.token_embedding = nn.Embedding(vocab_size, token_dim, padding_idx=PAD)
        self.text_mlp = nn.Sequential(nn.Linear(token_dim, 2 * token_dim), nn.ReLU(),
                                      nn.Linear(2 * token_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        if self.coords:
            ramp = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype, device=x.device)
            yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
            x = torch.cat([x, yy.expand(len(x), 1, -1, -1), xx.expand(len(x), 1, -1, -1)], dim=1)
        return self.visual(x)

    def encode_text(self, ids):
        mask = (ids != PAD).unsqueeze(-1).float()
        pooled = (self.token_embedding(ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.text_mlp(pooled)

    def forward(self, images, ids):
        return self.encode_image(images), self.encode_text(ids)


class DemoClipTokenizer:
    """list[str] -> LongTensor (N, L) of compact ids: CLIP BPE (start/end tokens, truncated at 77), each CLIP id
    mapped to its place in `vocab` (+2), unseen ids to OOV, rows right-padded with PAD to the longest."""

    def __init__(self, clip_tokenizer, vocab):
        self.clip_tokenizer = clip_tokenizer
        self.vocab = [int(v) for v in vocab]
        self.index = {v: i + 2 for i, v in enumerate(self.vocab)}

    def clip_ids(self, texts):
        return self.clip_tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS).input_ids

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        rows = [[self.index.get(t, OOV) for t in ids] for ids in self.clip_ids(texts)]
        out = torch.full((len(rows), max((len(r) for r in rows), default=1)), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out


def preprocess(image):
    """PIL image (any size and mode) -> (3, 32, 32) float tensor in [-1, 1], the training images' range.

    Resized bilinearly with antialiasing (in float, after conversion to RGB) when it is not already 32x32.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    if x.shape[-2:] != (32, 32):
        x = torch.nn.functional.interpolate(x[None], size=(32, 32), mode="bilinear", antialias=True,
                                            align_corners=False)[0]
    return x * 2 - 1


_CLIP_TOKENIZER = []


def clip_tokenizer():
    """The offline CLIP BPE tokenizer, built once per process (building it takes seconds)."""
    if not _CLIP_TOKENIZER:
        from ..models.clip import offline_clip_tokenizer
        _CLIP_TOKENIZER.append(offline_clip_tokenizer())
    return _CLIP_TOKENIZER[0]


def save_demo_clip(model, vocab, config, path):
    """config.json (architecture, vocabulary, split and data recipe) and model.safetensors into path."""
    from safetensors.torch import save
    from ..io import atomic_write_bytes, atomic_write_json
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(os.path.join(path, "model.safetensors"), save(state))
    atomic_write_json(os.path.join(path, "config.json"), {**config, "vocab": [int(v) for v in vocab]})


def load_demo_clip(path=DEFAULT_DIR, device="cpu"):
    """(model in eval mode, preprocess, tokenizer) of a demo CLIP folder, as utils.similarity.clip_scores expects.

    Missing or unreadable weights are a UserError that says how to rebuild them.
    """
    from safetensors.torch import load_file
    cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise UserError(f"demo CLIP weights not found in {path!r} (config.json and model.safetensors); "
                        f"rebuild them with `{REBUILD}` (a few minutes on a CPU)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        model = DemoClip(len(cfg["vocab"]) + 2, **cfg["architecture"])
        model.load_state_dict(load_file(w_path))
    except Exception as e:
        raise UserError(f"demo CLIP in {path!r} is unreadable or corrupt ({' '.join(str(e).split())[:200]}); "
                        f"rebuild it with `{REBUILD}`") from None
    return model.to(device).eval(), preprocess, DemoClipTokenizer(clip_tokenizer(), cfg["vocab"])


# ------------------------------------------------------------------------------------------------ data

_DATA = {}


def dataset(seed=0, n_shared=30, generic=True):
    """demo_data.build_dataset, memoized per process (it takes seconds); treat the result as read-only."""
    key = (seed, n_shared, generic)
    if key not in _DATA:
        from .data import build_dataset
        _DATA[key] = build_dataset(seed=seed, n_shared=n_shared, generic=generic)
    return _DATA[key]


def holdout_indices(data, frac=0.1, seed=0):
    """Sorted indices of a seeded round(frac * N) of the images that are not memorized."""
    memorized = {k for _, k in data["memorized"]}
    pool = [i for i in range(len(data["images"])) if i not in memorized]
    n = round(frac * len(data["images"]))
    if not 0 <= n <= len(pool):
        raise ValueError(f"cannot hold out {n} of {len(pool)} images")
    return sorted(np.random.default_rng(seed + 10).choice(pool, size=n, replace=False).tolist())


def training_pairs(data, holdout):
    """Distinct (image index, caption) pairs of the images not held out: templated, generic, memorized, shared."""
    out = set()
    for i, caps in enumerate(data["captions"]):
        out.update((i, c) for c in caps)
    out.update((i, c) for i, c in enumerate(data["generic"]))
    out.update((i, c) for c, i in data["memorized"])
    out.update((i, c) for c, i in data["shared"])
    held = set(holdout)
    return sorted(p for p in out if p[0] not in held)


def build_vocab(tokenizer, captions):
    """Sorted CLIP token ids that occur in the captions (start and end tokens included)."""
    return sorted({t for ids in tokenizer(captions, truncation=True, max_length=MAX_TOKENS).input_ids for t in ids})


# ---------------------------------------------------------------------------------------------- training

def warmup_cosine(opt, steps, warmup_frac=0.05):
    warmup = max(1, round(warmup_frac * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))


def multi_positive_loss(img, txt, logit_scale, positive):
    """Symmetric CLIP loss with several positives: targets uniform over positive[i, j] in each row / column."""
    img = nn.functional.normalize(img, dim=1)
    txt = nn.functional.normalize(txt, dim=1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    pos = positive.float()
    i2t = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (i2t + t2i) / 2


def train(data, holdout, steps, batch_size=256, lr=2e-3, weight_decay=1e-4, token_dropout=0.1,
          architecture=None, seed=0, log=None, progress=None):
    """Train a DemoClip on the training split; returns (model in eval mode, vocab: list of CLIP ids).

    Deterministic on CPU for a given seed and thread count. log: list to append {"step", "loss", "lr",
    "logit_scale"} to every 25 steps (and at the end); progress: an iterable wrapper (e.g. tqdm) for the steps.
    """
    tok = clip_tokenizer()
    pairs = training_pairs(data, holdout)
    captions = sorted({c for _, c in pairs})
    vocab = build_vocab(tok, captions)
    tokenizer = DemoClipTokenizer(tok, vocab)
    cap_ids = tokenizer(captions)  # (U, L)
    cap_index = {c: j for j, c in enumerate(captions)}
    img_idx = torch.tensor([i for i, _ in pairs])
    cap_idx = torch.tensor([cap_index[c] for _, c in pairs])
    keys = torch.unique(img_idx * len(captions) + cap_idx)  # sorted: membership by searchsorted
    images = data["images"]

    torch.manual_seed(seed)
    model = DemoClip(len(vocab) + 2, **(architecture or {}))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "token_embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "token_embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr)
    sched = warmup_cosine(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    window = []
    steps_iter = range(steps) if progress is None else progress(range(steps))
    for step in steps_iter:
        b = torch.randint(len(pairs), (batch_size,), generator=gen)
        bi, bc = img_idx[b], cap_idx[b]
        ids = cap_ids[bc]
        if token_dropout > 0:
            content = ids > OOV
            content[:, 0] = False  # the start token stays
            content &= torch.roll(ids, -1, dims=1) != PAD  # the end token (last before padding) stays
            content[:, -1] = False
            drop = (torch.rand(ids.shape, generator=gen) < token_dropout) & content
            ids = torch.where(drop, torch.full_like(ids, OOV), ids)
        q = bi[:, None] * len(captions) + bc[None, :]
        pos = keys[torch.searchsorted(keys, q).clamp(max=len(keys) - 1)] == q
        img, txt = model(images[bi], ids)
        loss = multi_positive_loss(img, txt, model.logit_scale, pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100))
        window.append(loss.item())
        if log is not None and ((step + 1) % 25 == 0 or step + 1 == steps):
            log.append({"step": step + 1, "loss": round(sum(window) / len(window), 5),
                        "lr": sched.get_last_lr()[0], "logit_scale": round(model.logit_scale.exp().item(), 3)})
            window = []
    return model.eval(), vocab


# -------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _images(model, images):
    """Unit-norm image embeddings of (N, 3, 32, 32) tensors in [-1, 1]."""
    return nn.functional.normalize(model.encode_image(images), dim=1)


@torch.no_grad()
def _texts(model, tokenizer, texts):
    """Unit-norm text embeddings of a list of str."""
    return nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=1)


def _embed(model, tokenizer, images, texts):
    return _images(model, images), _texts(model, tokenizer, texts)


def zero_shot(model, tokenizer, data, indices, template=ZERO_SHOT):
    """Colour, digit and joint accuracy of the best of the 80 "{colour} x {digit}" prompts per image."""
    from .data import COLORS, DIGIT_NAMES
    names = list(COLORS)
    grid = [(c, d) for c in range(len(names)) for d in range(10)]
    img, txt = _embed(model, tokenizer, data["images"][indices],
                      [template.format(c=names[c], n=DIGIT_NAMES[d], d=d) for c, d in grid])
    best = (img @ txt.T).argmax(1)
    pc = torch.tensor([grid[k][0] for k in best.tolist()])
    pd = torch.tensor([grid[k][1] for k in best.tolist()])
    ok_c, ok_d = pc == data["colors"][indices], pd == data["labels"][indices]
    return {"colour": ok_c.float().mean().item(), "digit": ok_d.float().mean().item(),
            "both": (ok_c & ok_d).float().mean().item()}


def caption_retrieval(model, tokenizer, data, indices):
    """(top-1 accuracy, chance) of (a): the best of all distinct templated captions of `indices` is the image's own."""
    own = [set(data["captions"][i]) for i in indices]
    cands = sorted(set().union(*own))
    img, txt = _embed(model, tokenizer, data["images"][indices], cands)
    best = (img @ txt.T).argmax(1).tolist()
    acc = sum(cands[b] in o for b, o in zip(best, own)) / len(indices)
    return acc, sum(len(o) for o in own) / len(own) / len(cands)


def memorized_retrieval(model, tokenizer, data):
    """Accuracy of (c): each memorized caption picks its own memorized image among the memorized images; and the
    reverse (each memorized image picks its caption among the memorized captions)."""
    caps = [c for c, _ in data["memorized"]]
    img, txt = _embed(model, tokenizer, data["images"][[k for _, k in data["memorized"]]], caps)
    sim = img @ txt.T  # (image, caption), same order
    target = torch.arange(len(caps))
    return (sim.argmax(0) == target).float().mean().item(), (sim.argmax(1) == target).float().mean().item()


def score_scale(model, tokenizer, data, indices):
    """Mean CLIP scores (cosines) for reading mitigate_eval numbers: held-out images with their own "a {c}
    handwritten {n}" caption, with that caption for another digit and colour, and with an unrelated prompt;
    memorized captions with their memorized image, their shared images, and the held-out images."""
    from .data import COLORS, DIGIT_NAMES, UNRELATED_PROMPTS
    names = list(COLORS)
    lab, col = data["labels"][indices].tolist(), data["colors"][indices].tolist()
    own = [ZERO_SHOT.format(c=names[c], n=DIGIT_NAMES[d]) for d, c in zip(lab, col)]
    other = [ZERO_SHOT.format(c=names[(c + 1 + k % 7) % 8], n=DIGIT_NAMES[(d + 1 + k % 9) % 10])
             for k, (d, c) in enumerate(zip(lab, col))]
    unrelated = [UNRELATED_PROMPTS[k % len(UNRELATED_PROMPTS)] for k in range(len(indices))]
    img = _images(model, data["images"][indices])
    pair = lambda texts: (img * _texts(model, tokenizer, texts)).sum(1).mean().item()
    caps = [c for c, _ in data["memorized"]]
    mimg, mtxt = _embed(model, tokenizer, data["images"][[k for _, k in data["memorized"]]], caps)
    held = set(indices)
    shared = [(caps.index(c), i) for c, i in data["shared"] if i not in held]
    simg = _images(model, data["images"][[i for _, i in shared]])
    return {"heldout_own_caption": pair(own), "heldout_other_digit_and_colour": pair(other),
            "heldout_unrelated_prompt": pair(unrelated),
            "memorized_caption_memorized_image": (mimg * mtxt).sum(1).mean().item(),
            "memorized_caption_shared_images": (simg * mtxt[[r for r, _ in shared]]).sum(1).mean().item(),
            "memorized_caption_heldout_images": (img @ mtxt.T).mean().item()}


def evaluate(model, tokenizer, data, holdout, seed=0):
    """The metrics of the module docstring on the held-out images, plus (a) and (b) on as many training images
    (a seeded sample) for the generalization gap, and mean scores (score_scale)."""
    from .data import COLORS
    memorized = {k for _, k in data["memorized"]}
    held = set(holdout)
    pool = [i for i in range(len(data["images"])) if i not in held and i not in memorized]
    train_sample = sorted(np.random.default_rng(seed + 11).choice(pool, size=len(holdout), replace=False).tolist())
    out = {"chance": {"caption_top1": None, "colour": 1 / len(COLORS), "digit": 0.1, "both": 1 / (10 * len(COLORS)),
                      "memorized": 1 / len(data["memorized"])}}
    for name, idx in (("heldout", holdout), ("train_sample", train_sample)):
        acc, chance = caption_retrieval(model, tokenizer, data, idx)
        out[name] = {"n_images": len(idx), "caption_top1": acc, "zero_shot": zero_shot(model, tokenizer, data, idx),
                     "zero_shot_unseen_template": zero_shot(model, tokenizer, data, idx, ZERO_SHOT_UNSEEN)}
        if name == "heldout":
            out["chance"]["caption_top1"] = chance
    t2i, i2t = memorized_retrieval(model, tokenizer, data)
    out["memorized"] = {"caption_to_image": t2i, "image_to_caption": i2t}
    out["mean_scores"] = score_scale(model, tokenizer, data, holdout)
    return out
