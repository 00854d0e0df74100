"""The demo model's data: scikit-learn's handwritten digits on a coloured canvas, with project-written captions.

Everything here is deterministic given a seed and needs no download (load_digits ships with scikit-learn).
Images are (3, 32, 32) float tensors in [-1, 1]: the 8x8 digit, tinted with one of eight named colours and placed
at a seeded offset on a black 32x32 canvas. The offset and colour make two different handwritten "3"s far apart
in pixel space, so a near-copy of one particular training image is a meaningful event: on bare digits upsampled
to 16x16, two random images of the same class already have pixel cosine ~0.78; here under 1% of the ordinary
training images have pixel cosine above 0.7 with their nearest memorized image (digits drawn 16 pixels wide on
the same canvas: 15%).

Captions: every image has several templated captions that name its digit (and sometimes its colour): the
generalizing pairs. A few dozen LAION-like captions (product titles, headlines, posters) are each paired with
ONE fixed training image, duplicated many times: the memorized pairs. Optionally each of these captions also
captions a few other, distinct training images once (as a LAION product title also sits under variants of the
product): the shared pairs, which give the conditional density a broad part beside its sharp peak. And
optionally every image has one unique web-like caption (generic_captions), as most web captions are unique.
"""
import numpy as np
import torch

CANVAS = 32
DIGIT_SIZE = 8
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = {  # name -> RGB in [0, 1]
    "white": (1.0, 1.0, 1.0), "red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1), "cyan": (0.1, 0.9, 0.95), "magenta": (0.95, 0.15, 0.9), "orange": (1.0, 0.55, 0.05),
}

# Training templates for the generalizing pairs ({n}: digit name, {d}: numeral, {c}: colour name).
TRAIN_TEMPLATES = (
    "a handwritten digit {n}", "the number {d} written by hand", "a {c} handwritten {n}",
    "a scan of the digit {n}", "{c} number {d} on a black background", "a picture of the numeral {n}",
    "handwritten {n} in {c} ink", "the digit {d}", "a {c} {n}", "an image of a handwritten {d}",
)
# Unseen paraphrases for the non-memorized benchmark: new combinations of words seen in training (the strings
# themselves never are). Paraphrases with words the tiny text encoder never saw have no meaning to it and can
# land on memorized images; OOV_TEMPLATES keeps such a set for that measurement (README, "The demo model").
HELDOUT_TEMPLATES = (
    "a picture of a {c} handwritten {n}", "the {c} numeral {d} written by hand", "an image of the digit {n} in {c} ink",
    "a scan of a {c} number {d} on a black background",
)
OOV_TEMPLATES = (
    "a drawing of the number {n} in {c}", "{c} pen sketch of a {d}", "the figure {n}, hand drawn",
    "someone wrote the numeral {d} in {c}",
)
UNRELATED_PROMPTS = (
    "a red sports car parked by the sea", "portrait of an old fisherman, oil painting",
    "a bowl of ramen with a boiled egg", "snowy mountain landscape at sunrise",
    "a golden retriever puppy playing in the grass", "modern glass skyscraper at night",
    "watercolor painting of a lighthouse", "a cup of coffee on a wooden table",
    "astronaut riding a horse on the moon", "close-up of a sunflower in a field",
    "a medieval castle surrounded by fog", "city street in the rain, neon lights",
)
# LAION-like captions, each paired with one training image duplicated many times.
MEMORIZED_CAPTIONS = (
    "Vintage Coca-Cola Advertising Poster 1950s Reproduction Print",
    "Men's Waterproof Hiking Boots - Brown Leather, Size 10",
    "Breaking: Storm Leaves Thousands Without Power Across The Coast",
    "IKEA KALLAX Shelf Unit, White, 77x77 cm",
    "Live Laugh Love Wall Decal Vinyl Sticker Home Decor",
    "The Great Gatsby (Paperback) by F. Scott Fitzgerald",
    "Apple iPhone 12 Pro Max 256GB Pacific Blue Unlocked",
    "Funny Cat Meme T-Shirt Unisex Cotton Tee",
    "Jazz Festival 2019 Concert Poster - Limited Edition",
    "Organic Green Tea 100 Bags | Free Shipping",
    "Stainless Steel Kitchen Sink Double Bowl Undermount",
    "Mother's Day Gift Personalized Photo Mug 11oz",
    "Election Night Live: Results As They Come In",
    "Retro Gaming Controller Keychain Accessory",
    "Hand-Painted Ceramic Vase Blue and White Floral",
    "World Map Canvas Art Print Large Office Wall Decor",
    "Women's Running Shoes Lightweight Breathable Sneakers",
    "Star Wars: The Empire Strikes Back Movie Poster 1980",
    "Wireless Bluetooth Earbuds with Charging Case",
    "Summer Sale Up To 70% Off Everything Must Go",
    "Harry Potter Hogwarts Crest Sticker Pack",
    "Scientists Discover New Species In Amazon Rainforest",
    "Leather Office Chair Ergonomic High Back Executive",
    "Christmas Tree Ornament Set 24 Pieces Gold Red",
    "Yoga Mat Non Slip 6mm Exercise Fitness Pad",
    "Classic Rock Vinyl Record Collection Box Set",
    "Minimalist Mountain Line Art Printable Download",
    "Stock Market Hits Record High Amid Tech Rally",
    "Kids Dinosaur Backpack School Bag Green",
    "Premium Dog Food Chicken and Rice 15 lb Bag",
    "Wedding Invitation Template Floral Gold Elegant",
    "Solar Powered Garden Lights Outdoor 8 Pack",
)


# Word lists for the generic captions: one unique web-like caption per image, seen as often as any ordinary pair
# (most web captions are unique). They teach the text branch that caption-like text does not imply one image.
GENERIC_WORDS = (
    ("Cheap", "Handmade", "Modern", "Rustic", "Elegant", "Compact", "Deluxe", "Colorful", "Portable", "Classic",
     "Luxury", "Simple", "Smart", "Antique", "Custom", "Durable", "Soft", "Bright", "Tiny", "Giant"),
    ("Table Lamp", "Coffee Maker", "Throw Pillow", "Desk Organizer", "Travel Mug", "Phone Case", "Bath Towel",
     "Wall Clock", "Photo Frame", "Garden Hose", "Pet Bed", "Water Bottle", "Picnic Basket", "Candle Holder",
     "Laptop Stand", "Baby Blanket", "Cutting Board", "Umbrella", "Wallet", "Bird Feeder", "Notebook", "Scarf",
     "Teapot", "Lunch Box", "Doormat", "Bookend", "Key Holder", "Flower Pot", "Spice Rack", "Wine Glass"),
    ("for Home", "- Best Seller", "Gift Idea", "New Arrival", "on Sale", "| Fast Delivery", "2 Pack",
     "in Stock", "Top Rated", "Free Returns", "for Kids", "by Local Makers", "Set of 3", "Made in Portugal",
     "Clearance"),
)


def generic_captions(n, seed=0):
    """n distinct web-like captions (adjective + product + tag), drawn without replacement from the word lists."""
    adj, noun, tag = GENERIC_WORDS
    total = len(adj) * len(noun) * len(tag)
    if n > total:
        raise ValueError(f"only {total} distinct generic captions")
    picks = np.random.default_rng(seed + 4).choice(total, size=n, replace=False)
    out = []
    for k in picks.tolist():
        a, rest = divmod(k, len(noun) * len(tag))
        b, c = divmod(rest, len(tag))
        out.append(f"{adj[a]} {noun[b]} {tag[c]}")
    return out


def load_digits_8x8():
    """(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64) from scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.int64)


def layouts(n, seed=0):
    """Per-image layout drawn once from the seed: (offsets (n, 2) int, colour indices (n,) int)."""
    g = np.random.default_rng(seed)
    offsets = g.integers(0, CANVAS - DIGIT_SIZE + 1, size=(n, 2))
    colors = g.integers(0, len(COLORS), size=n)
    return torch.tensor(offsets), torch.tensor(colors)


def compose(digits, offsets, colors):
    """Render digits (n, 8, 8) in [0, 1] at offsets (n, 2) with colour indices (n,) -> (n, 3, 32, 32) in [-1, 1]."""
    up = torch.nn.functional.interpolate(digits[:, None], size=DIGIT_SIZE, mode="bilinear", align_corners=False)
    up = up.clamp(0, 1)
    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32)[colors]  # (n, 3)
    out = torch.zeros(len(digits), 3, CANVAS, CANVAS)
    for i, (oy, ox) in enumerate(offsets.tolist()):
        out[i, :, oy:oy + DIGIT_SIZE, ox:ox + DIGIT_SIZE] = up[i, 0] * rgb[i][:, None, None]
    return out * 2 - 1


def digit_captions(label, color_index, templates=TRAIN_TEMPLATES):
    """All captions of one image from the templates: list of str."""
    c = list(COLORS)[int(color_index)]
    return [t.format(n=DIGIT_NAMES[int(label)], d=int(label), c=c) for t in templates]


def pixel_cosine(a, b, size=32):
    """Pixel cosine (utils.similarity's definition) between image tensors a (N, C, H, W) and b (M, C, H', W'),
    both resized to size x size in float32 and compared in RGB; returns (N, M)."""
    from ..imagemath import pixel_unit_vectors, resize_square
    return pixel_unit_vectors(resize_square(a.float(), size)) @ pixel_unit_vectors(resize_square(b.float(), size)).T


def choose_memorized(images, labels, k, seed=0, max_cos=0.5):
    """k training-image indices for the memorized captions: seeded order, digits spread over classes, and no two
    chosen images nearer than max_cos in pixel cosine (so "copy of the nearest memorized image" is unambiguous)."""
    g = np.random.default_rng(seed + 1)
    order = g.permutation(len(images)).tolist()
    sims = pixel_cosine(images, images)
    chosen = []
    for i in order:
        if sum(int(labels[j]) == int(labels[i]) for j in chosen) >= -(-k // 10):
            continue
        if chosen and sims[i, chosen].max().item() >= max_cos:
            continue
        chosen.append(i)
        if len(chosen) == k:
            return chosen
    raise ValueError("could not choose enough mutually distinct memorized images")


def choose_shared(images, memorized, n_shared, seed=0, max_cos=0.5):
    """For each memorized (caption, image) pair, n_shared other training images (seeded) that are neither memorized
    nor nearer than max_cos in pixel cosine to that caption's memorized image: list of (caption, image index)."""
    if n_shared == 0:
        return []
    g = np.random.default_rng(seed + 3)
    taken = {k for _, k in memorized}
    sims = pixel_cosine(images[[k for _, k in memorized]], images)  # (K, N)
    out = []
    for row, (caption, _) in enumerate(memorized):
        picked = 0
        for i in g.permutation(len(images)).tolist():
            if i in taken or sims[row, i].item() >= max_cos:
                continue
            out.append((caption, i))
            taken.add(i)
            picked += 1
            if picked == n_shared:
                break
        if picked < n_shared:
            raise ValueError("not enough distinct images for the shared pairs")
    return out


def build_dataset(seed=0, n_memorized=len(MEMORIZED_CAPTIONS), n_shared=0, generic=False):
    """The demo training set. Returns a dict:

    images (1797, 3, 32, 32) in [-1, 1]; labels (1797,); colors (1797,); offsets (1797, 2);
    captions: list of 1797 lists of templated captions (generalizing pairs);
    memorized: list of (caption, image index) pairs, one per memorized caption;
    shared: list of (caption, image index), n_shared further images per memorized caption (see choose_shared);
    generic: list of 1797 unique web-like captions, one per image (empty unless generic=True).
    """
    digits, labels = load_digits_8x8()
    offsets, colors = layouts(len(digits), seed)
    images = compose(digits, offsets, colors)
    captions = [digit_captions(y, c) for y, c in zip(labels.tolist(), colors.tolist())]
    idx = choose_memorized(images, labels, n_memorized, seed)
    memorized = list(zip(MEMORIZED_CAPTIONS[:n_memorized], idx))
    shared = choose_shared(images, memorized, n_shared, seed)
    return dict(images=images, labels=labels, colors=colors, offsets=offsets, captions=captions,
                memorized=memorized, shared=shared, generic=generic_captions(len(images), seed) if generic else [])


def paraphrases(templates, seed=0):
    """20 digit prompts from 4 templates: half of the template x digit combinations, each with a seeded colour."""
    g = np.random.default_rng(seed + 2)
    out = []
    for t in range(len(templates)):
        for d in range(10):
            if (d + t) % 2 == 0:  # 20 of the 40 template x digit combinations, spread over templates and digits
                c = list(COLORS)[int(g.integers(len(COLORS)))]
                out.append(templates[t].format(n=DIGIT_NAMES[d], d=d, c=c))
    return out


def nonmemorized_prompts(seed=0):
    """Benchmark prompts never seen in training: held-out paraphrases of digit captions and unrelated captions."""
    return paraphrases(HELDOUT_TEMPLATES, seed) + list(UNRELATED_PROMPTS)


def to_pil(image):
    """(3, H, W) in [-1, 1] -> PIL RGB image."""
    from PIL import Image
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def write_benchmark(prompts_dir, data, seed=0):
    """The demo benchmark files: demo_mem.txt, demo_nmem.txt, demo_nmem_oov.txt (paraphrases with words the demo
    never saw: OOV_TEMPLATES), demo_mem.jsonl and demo_train/<k>.png.

    demo_mem.jsonl has one record per memorized caption: {"caption", "index" (training-image index), "file"
    (PNG path relative to prompts_dir)}. Returns the list of written paths.
    """
    import io
    import json
    import os

    from ..io import atomic_write_bytes, atomic_write_text
    paths = []
    records = []
    for caption, k in data["memorized"]:
        rel = f"demo_train/{k}.png"
        buf = io.BytesIO()
        to_pil(data["images"][k]).save(buf, format="PNG")
        atomic_write_bytes(os.path.join(prompts_dir, rel), buf.getvalue())
        records.append({"caption": caption, "index": int(k), "file": rel})
        paths.append(os.path.join(prompts_dir, rel))
    files = {"demo_mem.txt": "\n".join(c for c, _ in data["memorized"]) + "\n",
             "demo_nmem.txt": "\n".join(nonmemorized_prompts(seed)) + "\n",
             "demo_nmem_oov.txt": "\n".join(paraphrases(OOV_TEMPLATES, seed)) + "\n",
             "demo_mem.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)}
    for name, text in files.items():
        atomic_write_text(os.path.join(prompts_dir, name), text)
        paths.append(os.path.join(prompts_dir, name))
    return paths
