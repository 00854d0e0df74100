"""The registry of mitigation methods (the comparison of the paper's Figure 6) and the naming of their runs.

  none       plain sampling (utils.mitigation.none)
  sail       SAIL (Jeon et al., 2025; utils.mitigation.sail): searched initial noise
  wen        Wen et al. (ICLR 2024; .wen): the prompt embedding optimized at the first step down to a target loss
  rna, rta   Somepalli et al. (2023), as in Wen et al.'s code (.augment): random numbers / tokens inserted in the prompt
  cfg_delay  Jain et al. (CVPR 2025; .cfg_delay): no guidance until a transition point (static timestep or dynamic)
  ren        Ren et al. (ECCV 2024; .ren): cross-attention edit while sampling
  han_batch, han_sample  Han et al. (NeurIPS 2025; .han): the initial noise adjusted, batch-wise or per sample
  guard      GUARD (ICML 2026; .guard): attractive-repulsive guidance, attention-spike tokens attenuated
  nemo       NeMo (Hintersdorf et al., NeurIPS 2024; .nemo): a prompt's memorization neurons switched off

Adding a method = one file with its settings dataclass, plan function and Method record (utils.mitigation.base),
registered here (or by register() from elsewhere); mitigate_mem.py takes its flags from the settings dataclass.
"""
import dataclasses

from . import augment, cfg_delay, guard, han, nemo, none, ren, sail, wen
from .base import Context, Method, Plan, folder_tag, run_plan  # noqa: F401  (the harness, for the scripts)
from .none import plan_none  # noqa: F401  (the prompts a gate does not flag)
from ..models.samplers import DEFAULT_SAMPLER, SAMPLERS  # noqa: F401  (the --sampler choices)

METHODS = {}


def register(method):
    """Add a Method record to the registry (by its name; a name already taken is a ValueError). Returns it."""
    if method.name in METHODS:
        raise ValueError(f"a mitigation method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _m in (none.METHOD, sail.METHOD, wen.METHOD, augment.RNA, augment.RTA, cfg_delay.METHOD, ren.METHOD, han.BATCH,
           han.SAMPLE, guard.METHOD, nemo.METHOD):
    register(_m)


def grid_settings(method, base, values=None, family=None):
    """The settings of a grid: base with each override applied. values: list of strings (a ValueError names the
    bad one) or None for the papers' grid for the model family (its profile's hparams 'grids', else the method's
    own grid). Returns a list of settings objects (ValueError for invalid settings)."""
    m = METHODS[method]
    if m.grid_field is None:
        raise ValueError(f"{method} has no hyperparameter to grid over")
    if values is None:
        overrides = (family.hparam("grids", {}) if family else {}).get(method) or m.grid
        if not overrides:
            raise ValueError(f"{method} has no published grid for the {family.name if family else 'unknown'} family; "
                             "give the values")
    else:
        overrides = []
        for v in values:
            try:
                overrides.append(m.grid_type(v))
            except ValueError:
                raise ValueError(f"grid value {v!r} is not a valid {m.grid_field} for {method}") from None
    return [dataclasses.replace(base, **o) for o in overrides]


def with_family_defaults(method, settings, family):
    """The settings with each of the method's family_defaults fields that is None set to the family's value
    (ValueError when the family has none: the user must give it)."""
    fill = {}
    for field, key in METHODS[method].family_defaults:
        if getattr(settings, field) is None:
            value = family.hparam(key)
            if value is None:
                raise ValueError(f"the {family.name} family has no value for {field}; give it")
            fill[field] = value
    for field, key in METHODS[method].family_needs:
        if getattr(settings, field) is None and family.hparam(key) is None:
            raise ValueError(f"the {family.name} family has no value for {field}; give it")
    return dataclasses.replace(settings, **fill) if fill else settings


def setting_label(method, settings_dict):
    """Short text naming one setting of a method, e.g. 'thres=0.6', 'n=4', 't=500, w=0'."""
    m = METHODS.get(method)
    return m.label(settings_dict) if m and m.label else ""


def setting_sort_key(method, settings_dict):
    """Order of a method's settings: its own sort_key, else its grid hyperparameter ascending (settings without
    it last)."""
    m = METHODS.get(method)
    if m and m.sort_key:
        return m.sort_key(settings_dict)
    v = settings_dict.get(m.grid_field) if m and m.grid_field else None
    return (0, v) if isinstance(v, (int, float)) else (1, 0)


def sampling(method, family, sampler=None, author=False, guidance_scale=7.5):
    """(sampler, guidance scale, source) of a run: the harness's (DDIM unless --sampler, guidance_scale), or with
    author=True the method's author settings for the family (ValueError for a method that has none; source: where
    they are from)."""
    if not author:
        return sampler or DEFAULT_SAMPLER, guidance_scale, None
    rule = METHODS[method].author
    if rule is None:
        raise ValueError(f"--author_settings: {method} has none (its authors' released code samples as the harness "
                         "does: DDIM, guidance 7.5)")
    got = rule(family)
    sampler, w = got.get("sampler", DEFAULT_SAMPLER), got.get("guidance_scale", guidance_scale)
    # the same sampling as the harness's is the same run (same identity and folder as without the option)
    return sampler, w, (None if (sampler, w) == (DEFAULT_SAMPLER, guidance_scale) else got.get("source"))


def flag_problem(method, *, flagged_by=None, flag_threshold=None, flag_fpr=None, flag_nmem=None, prompt_batch=1,
                 grid=None, sampler=None, author_settings=False, guidance_scale=None):
    """The first problem of a mitigate_mem.py flag combination for `method` (a message for the parser's error), or
    None: the gate's flags together, SAIL's prompt batch, the sampler and guidance against --author_settings."""
    gate = (flag_threshold is not None, flag_fpr is not None)
    m = METHODS[method]
    checks = [
        (flagged_by and gate.count(True) != 1,
         "--flagged_by needs exactly one of --flag_threshold and --flag_fpr (with --flag_nmem)"),
        (not flagged_by and (any(gate) or flag_nmem), "--flag_threshold / --flag_fpr / --flag_nmem need --flagged_by"),
        (flag_fpr is not None and not flag_nmem,
         "--flag_fpr needs --flag_nmem (detection scores of non-memorized prompts)"),
        (prompt_batch > 1 and m.batch is None, f"--miti_prompt_batch batches SAIL's search; --method {method} has none"),
        (author_settings and sampler, "--author_settings chooses the sampler; give one of --sampler and "
                                      "--author_settings"),
        (method == "cfg_delay" and guidance_scale is not None,
         "--guidance_scale: cfg_delay's guidance is --cfg_w_pre / --cfg_w_post"),
        (author_settings and guidance_scale is not None,
         "--author_settings chooses the guidance scale; give one of --guidance_scale and --author_settings"),
        (author_settings and m.author is None,
         f"--author_settings: {method} has none (its authors' code samples as the harness: DDIM, guidance 7.5)"),
        (m.grid_field is None and (grid or flagged_by), f"--method {method} has nothing to grid over or to gate")]
    return next((msg for bad, msg in checks if bad), None)


def sampling_identity(sampler, guidance_scale, author_source=None):
    """What a run's sampling adds to its identity: nothing for the harness's DDIM (so that runs from before the
    option resume and stay bit-identical), else {'sampler': name}; the authors' settings' source when used."""
    out = {} if sampler == DEFAULT_SAMPLER else {"sampler": sampler}
    return dict(out, author_settings=author_source) if author_source else out


def sampling_tag(sampler, guidance_scale, default_guidance=7.5):
    """Folder-name suffix of a run's sampling: '' for DDIM at the harness's guidance, e.g. '_euler_g7'."""
    return (("" if sampler == DEFAULT_SAMPLER else f"_{sampler}")
            + ("" if guidance_scale == default_guidance else f"_g{guidance_scale:g}"))


def folder_name(prompt_type, method, label, gridded, gated, sampling=""):
    """Output folder of one run (SAIL and none keep the reference's names); sampling: sampling_tag's suffix."""
    name = {"none": prompt_type + "_nomiti", "sail": prompt_type}.get(method, f"{prompt_type}_{method}")
    if gridded:
        name = f"{prompt_type}_{method}_{folder_tag(label)}"
    return name + sampling + ("_gated" if gated else "")


def describe_run(header):
    """(method, setting label, settings dict, gated) of a generation manifest header; headers written before the
    method registry (SAIL and --no_mitigation runs) are understood too. A run with another sampler or guidance
    than the harness's (DDIM, 7.5) says so in its label, e.g. 'C=1.25, euler, w=7'."""
    from ..cli import UserError, one_line
    method = header.get("method") or ("none" if header.get("no_mitigation") else "sail")
    settings = header.get("settings") or header.get("sail") or {}
    try:
        label = setting_label(method, settings)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged or hand-edited header
        raise UserError(f"a generation header of method {method!r} without its settings ({type(e).__name__}: "
                        f"{one_line(e)}): not a header written by mitigate_mem.py") from None
    variant = run_variant(header)
    if variant:
        label = ", ".join(([label] if label else []) + [variant])
    return method, label, settings, bool(header.get("gate"))


def run_variant(header):
    """How a generation header's sampling differs from the harness's (DDIM, guidance 7.5), as label text, e.g.
    'euler, w=7'; '' for the harness's own (the figure draws each variant of a method as its own curve)."""
    extra = [header["sampler"]] if header.get("sampler") else []
    if header.get("guidance_scale", 7.5) != 7.5:
        extra.append(f"w={header['guidance_scale']:g}")
    return ", ".join(extra)
