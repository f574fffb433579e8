"""The embedded default dataset: synthetic chest radiographs ("phantoms"), generated on first use.

So that `python -m medssl_jax.main` works offline on a fresh machine, a labelled chest-X-ray-like dataset
is rendered deterministically from a seed with numpy and written with the same `StoreWriter` that real
ingestion uses. It is built to be an honest test of self-supervised pretraining: a task on which SSL can
help and on which the features of a (fairly initialised) random encoder are weak.

What it models:
* Anatomy, drawn as an attenuation map in patient coordinates: body outline, two lung fields (air),
  diaphragm domes, mediastinum and heart shadow, spine, posterior ribs, clavicles, and lung markings.
  Every patient has their own anatomy (modest ranges, `ANATOMY`).
* Findings, per patient (so shared by all of that patient's images), in patient coordinates: nodule (a
  dense blob at a random place in one lung), effusion (basal opacity with a lateral meniscus),
  cardiomegaly (widened heart shadow: a ratio to the thorax, so framing does not give it away) and
  pneumothorax (an apical-lateral rim without lung markings, more lucent, behind a pleural line).
* Acquisition (nuisance), strong on purpose and inside what the pretraining augmentations cover: framing
  (shift, rotation up to 20 degrees, scale 0.8-1.25, AP magnification), exposure (beam energy, gain,
  offset, gamma 0.5-2, heel effect) and quantum noise. Each of these is drawn partly per patient (the
  site protocol and habitus: a patient's films look alike) and partly per image (`WITHIN_PATIENT`).
  Collimation margins, the side marker, inspiration depth, lung-marking texture and the noise pattern
  are drawn per image: they differ between a patient's films, which no single-image augmentation
  reproduces (what MICLe's positives teach). Pooled features of a random network are dominated by this
  variation, which is what pretraining learns to ignore.
* Independence: labels are drawn first and nothing depends on them but the rendering of the findings;
  anatomy, finding geometry and acquisition come from their own child random streams (a test fits a
  probe on every nuisance draw alone and finds chance-level AUC for every label).
* Splits: patient-wise 'train' / 'val' / 'test' (`SPLIT_FRACTIONS`: 45 / 15 / 40 %). Positives per label
  are drawn with exact counts inside each split, so every label has positives and negatives everywhere.

`ensure_phantom_store(cache_dir, num_patients=..., image_size=..., seed=...)` returns the store path,
generating it only when it is absent or incomplete. The directory name encodes the generator version
and every parameter, so changing a parameter never reuses a stale store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medssl_jax.data.store import Store, StoreError, StoreWriter

# Bump when rendering changes: the version is part of the cache directory name.
GENERATOR_VERSION = 6
LABEL_NAMES = ("nodule", "effusion", "cardiomegaly", "pneumothorax")
PREVALENCES = (0.15, 0.25, 0.30, 0.10)
# Probability of a patient having 1, 2, 3 or 4 images.
IMAGES_PER_PATIENT_P = (0.30, 0.35, 0.20, 0.15)
TEST_FRACTION = 0.3
# Images rendered per numpy pass: bounds peak memory (~40 float32 temporaries of chunk x H x W).
_RENDER_CHUNK = 32
_HEART_NORMAL_SCALE = (1.0, 0.05)  # mean, std of heart width relative to the reference anatomy
_HEART_ENLARGED_SCALE = (1.3, 1.5)  # uniform range when the patient has cardiomegaly
_NUM_MARKING_WAVES = 6


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDSSL_JAX_CACHE", Path.home() / ".cache" / "medssl_jax"))


def phantom_store_name(*, num_patients: int, image_size: int, seed: int) -> str:
    return f"phantom_cxr-v{GENERATOR_VERSION}-p{num_patients}-s{image_size}-seed{seed}"


def ensure_phantom_store(cache_dir: str | os.PathLike | None = None, *, num_patients: int = 300,
                         image_size: int = 128, seed: int = 0) -> Path:
    """Returns the path of a complete phantom store, generating it first if needed (idempotent).

    Generation goes to a temporary sibling directory that is renamed into place when complete, so
    concurrent callers and interrupted runs never see or leave a half-written store at the final path.
    """
    if num_patients < 6:
        raise ValueError(f"num_patients={num_patients}: need at least 6 (train, val and test all need "
                         "positives and negatives)")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: need at least 32 pixels")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    final = cache_dir / phantom_store_name(num_patients=num_patients, image_size=image_size, seed=seed)
    if _is_complete(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=cache_dir))
    try:
        write_phantom_store(tmp, num_patients=num_patients, image_size=image_size, seed=seed)
        if _is_complete(final):  # another process finished first; its store is identical
            return final
        if final.exists():  # left over from an interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_complete(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        Store(path)
    except StoreError:
        return False
    return True


def write_phantom_store(path: str | os.PathLike, *, num_patients: int, image_size: int, seed: int,
                        overwrite: bool = True) -> None:
    """Renders the phantom dataset and writes it as a store at `path`."""
    cohort = sample_cohort(num_patients=num_patients, seed=seed)
    name = phantom_store_name(num_patients=num_patients, image_size=image_size, seed=seed)
    with StoreWriter(path, name=name, label_names=LABEL_NAMES, overwrite=overwrite) as writer:
        num_images = len(cohort["image_patient"])
        for start in range(0, num_images, _RENDER_CHUNK):
            image_ids = np.arange(start, min(start + _RENDER_CHUNK, num_images))
            images = render_images(cohort, image_ids, image_size=image_size)
            for k, i in enumerate(image_ids):
                p = cohort["image_patient"][i]
                writer.add(image=images[k], patient=f"phantom-{p:05d}",
                           study=f"phantom-{p:05d}-study{cohort['image_study'][i]}",
                           view=cohort["image_view"][i], labels=cohort["labels"][p],
                           modality="DX", bits_stored=int(cohort["bits_stored"][p]),
                           split=cohort["split"][p], source_id=int(i))


# The ranges of every random draw. Nuisance (acquisition) ranges are wide on purpose and lie inside what
# the pretraining augmentations cover (crop scale, rotation, brightness/contrast/gamma jitter), so a
# network that has learned invariance to them has something a random one lacks. Tests and experiments
# read these names; change them only with a generator version bump.
ANATOMY = {
    "body_w": (0.82, 0.95), "lung_x": (0.33, 0.38), "lung_y": (-0.18, -0.12), "lung_ax": (0.24, 0.28),
    "lung_ay": (0.60, 0.68), "diaphragm_drop": (0.01, 0.05), "dome_h": (0.11, 0.17), "heart_y": (0.5, 0.6),
    "rib_curve": (0.6, 0.8), "clavicle_tilt": (-0.03, 0.03),
}
FINDINGS = {
    "nodule_du": (-0.55, 0.55), "nodule_dv": (-0.6, 0.35), "nodule_r": (0.07, 0.10), "nodule_amp": (0.4, 0.6),
    "effusion_height": (0.22, 0.4), "ptx_gap": (0.25, 0.4),
}
ACQUISITION = {
    "tx": (-0.12, 0.12), "ty": (-0.12, 0.12), "rot_deg": (-20.0, 20.0), "log_scale": (np.log(0.8), np.log(1.25)),
    "inspiration": (0.9, 1.06), "mu": (0.8, 1.8), "gain": (0.35, 1.0), "offset": (0.0, 0.2),
    "log_gamma": (np.log(0.5), np.log(2.0)), "heel": (-0.2, 0.2), "noise": (0.006, 0.04),
    "collimation": (0.0, 0.18), "marker_x": (0.6, 0.8), "marker_y": (-0.85, -0.6),
}
# Share of each acquisition range drawn per image; the rest is drawn once per patient (the site's
# protocol and the patient's habitus: a patient's films look alike in exposure and framing, different
# patients' films do not). Collimation, marker, inspiration, texture and noise are all per image.
WITHIN_PATIENT = {key: 0.3 for key in ("tx", "ty", "rot_deg", "log_scale", "mu", "gain", "offset", "log_gamma",
                                       "heel")}
RENDER = {"ptx_lucency": 0.3, "pleural_line": 0.3}
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.40}  # patient-wise; the rest is train


def _split_patients(n: int, rng: np.random.Generator) -> np.ndarray:
    """'train' / 'val' / 'test' per patient, with at least 2 patients in every split."""
    order = rng.permutation(n)
    counts = {name: max(2, round(fraction * n)) for name, fraction in SPLIT_FRACTIONS.items()}
    split = np.full(n, "train", dtype=object)
    start = 0
    for name, count in counts.items():
        split[order[start:start + count]] = name
        start += count
    if (split == "train").sum() < 2:
        raise ValueError(f"num_patients={n}: too few for train, val and test (need at least 6)")
    return split.astype(str)


def sample_cohort(*, num_patients: int, seed: int) -> dict[str, np.ndarray]:
    """Draws every random quantity of the dataset (patients, findings, views) from one seed.

    Patient arrays have leading dim num_patients; image arrays (prefix image_) have one row per image,
    images of a patient consecutive. Independence: the labels are drawn first and nothing else depends
    on them except the rendering of the findings; every anatomy, finding-geometry and acquisition draw
    comes from its own child generator, so it is independent of the labels by construction (and the
    streams do not shift when a label changes).
    """
    streams = np.random.SeedSequence(seed).spawn(4)
    rng_split, rng_anatomy, rng_finding, rng_image = (np.random.default_rng(s) for s in streams)
    n = num_patients
    c: dict[str, np.ndarray] = {}
    c["split"] = _split_patients(n, rng_split)
    labels = np.zeros((n, len(LABEL_NAMES)), np.float32)
    for name in ("train", "val", "test"):
        members = np.flatnonzero(c["split"] == name)
        for j, prevalence in enumerate(PREVALENCES):
            # Exact counts inside each split: both classes present, prevalence as specified.
            k = int(np.clip(round(prevalence * len(members)), 1, len(members) - 1))
            labels[rng_split.choice(members, size=k, replace=False), j] = 1.0
    c["labels"] = labels
    c["num_images"] = rng_anatomy.choice(np.arange(1, 5), size=n, p=IMAGES_PER_PATIENT_P)
    c["bits_stored"] = rng_anatomy.choice([12, 16], size=n)

    # Anatomy in normalised patient coordinates: u right-of-image, v downwards, both ~[-1, 1].
    for key, (low, high) in ANATOMY.items():
        c[key] = rng_anatomy.uniform(low, high, n)
    heart = rng_anatomy.normal(*_HEART_NORMAL_SCALE, n).clip(0.9, 1.1)
    enlarged_scale = rng_finding.uniform(*_HEART_ENLARGED_SCALE, n)
    c["heart_scale"] = np.where(labels[:, LABEL_NAMES.index("cardiomegaly")] == 1, enlarged_scale, heart)

    # Finding geometry is drawn for every patient and used only where the label is positive.
    c["nodule_side"] = rng_finding.choice([-1.0, 1.0], n)
    c["effusion_side"] = rng_finding.choice([-1.0, 1.0, 0.0], n, p=[0.4, 0.4, 0.2])  # 0 = bilateral
    c["ptx_side"] = rng_finding.choice([-1.0, 1.0], n)
    for key, (low, high) in FINDINGS.items():
        c[key] = rng_finding.uniform(low, high, n)

    image_patient = np.repeat(np.arange(n), c["num_images"])
    m = len(image_patient)
    c["image_patient"] = image_patient
    first_of_patient = np.concatenate([[0], np.cumsum(c["num_images"])[:-1]])
    within = np.arange(m) - first_of_patient[image_patient]
    c["image_study"] = within // 2  # pairs of images per study, like frontal + repeat
    a = ACQUISITION
    patient_part = rng_image.uniform(size=(n, len(a)))  # per-patient share of each acquisition draw
    keys = list(a)

    def u(key, size=m):
        """An acquisition draw: a per-patient part (site protocol, habitus) plus a per-image part."""
        low, high = a[key]
        w = WITHIN_PATIENT.get(key, 1.0)
        own = rng_image.uniform(size=size)
        base = patient_part[image_patient, keys.index(key)]
        if own.ndim == 2:
            base = base[:, None]
        return low + (high - low) * ((1 - w) * base + w * own)

    c["image_view"] = np.where(rng_image.uniform(size=m) < 0.7, "PA", "AP")
    c["image_tx"], c["image_ty"] = u("tx"), u("ty")
    c["image_rot"] = np.deg2rad(u("rot_deg"))
    c["image_scale"] = np.exp(u("log_scale"))
    c["image_inspiration"] = u("inspiration")  # lung height: deep vs shallow breath
    c["image_mu"] = u("mu")  # attenuation scale ~ beam energy
    c["image_gain"], c["image_offset"] = u("gain"), u("offset")
    c["image_gamma"] = np.exp(u("log_gamma"))
    c["image_heel"], c["image_noise"] = u("heel"), u("noise")
    c["image_noise_seed"] = rng_image.integers(0, 2**31, m)
    # Lung markings change with inspiration and projection, so they are drawn per image: a texture
    # that identified the patient would be a shortcut for patient-level contrastive learning.
    c["image_marking_freq"] = rng_image.uniform(4, 10, (m, _NUM_MARKING_WAVES))
    c["image_marking_angle"] = rng_image.uniform(0, np.pi, (m, _NUM_MARKING_WAVES))
    c["image_marking_phase"] = rng_image.uniform(0, 2 * np.pi, (m, _NUM_MARKING_WAVES))
    # Acquisition details that differ between a patient's images and carry no diagnosis: collimation
    # (unexposed, bright margins of random width) and the radiographer's side marker.
    c["image_collimation"] = u("collimation", (m, 4))  # left, right, top, bottom margins
    c["image_marker_x"] = rng_image.choice([-1.0, 1.0], m) * u("marker_x")
    c["image_marker_y"] = u("marker_y")
    return c


def _sig(z):
    """A smooth step (logistic), used for anti-aliased region edges."""
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _bones(u, v, patient, *, lung_x, lung_y, lung_ax, lung_ay, px) -> tuple[np.ndarray, ...]:
    """(ribs, thorax, spine, clavicles) masks in patient coordinates (u, v) for render_images."""
    # Ten-odd posterior ribs over the lung height, so their spacing follows the lung size.
    rib_spacing = 0.27 * lung_ay
    rib_v = v - patient("rib_curve") * (np.abs(u) - 0.05) ** 2 - (lung_y - lung_ay)
    ribs = _sig((np.cos(2 * np.pi * rib_v / rib_spacing) - 0.7) / 0.08)
    thorax = _sig((1 - (np.abs(u) - lung_x) ** 2 / (1.25 * lung_ax) ** 2
                   - (v - lung_y) ** 2 / (1.1 * lung_ay) ** 2) / 0.1)
    spine = _sig((0.055 - np.abs(u)) / (1.5 * px)) * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.11))
    clavicles = np.zeros_like(u)
    for side in (-1.0, 1.0):
        # Distance to the segment from the sternal end (near midline) to the shoulder.
        a = np.array([side * 0.07, -0.62], np.float32)
        b_v = -0.74 + patient("clavicle_tilt")
        du_seg, dv_seg = side * 0.48, b_v - a[1]
        t = np.clip(((u - a[0]) * du_seg + (v - a[1]) * dv_seg) / (du_seg ** 2 + dv_seg ** 2), 0, 1)
        dist = np.sqrt((u - a[0] - t * du_seg) ** 2 + (v - a[1] - t * dv_seg) ** 2)
        clavicles += _sig((0.032 - dist) / (1.5 * px))
    return ribs, thorax, spine, clavicles


def render_images(cohort: dict[str, np.ndarray], image_ids: np.ndarray, *, image_size: int) -> np.ndarray:
    """Renders the given images of a cohort as uint16 [n, S, S] (values within each one's bits_stored)."""
    pid = cohort["image_patient"][image_ids]

    def patient(key):
        return cohort[key][pid].astype(np.float32)[:, None, None]

    def image(key):
        return cohort[key][image_ids].astype(np.float32)[:, None, None]

    grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")
    # Pixel -> patient coordinates (inverse of the view's rigid transform). AP films magnify.
    is_ap = (cohort["image_view"][image_ids] == "AP")[:, None, None]
    scale = image("image_scale") * np.where(is_ap, np.float32(1.05), np.float32(1.0))
    cos, sin = np.cos(image("image_rot")), np.sin(image("image_rot"))
    xs, ys = x[None] - image("image_tx"), y[None] - image("image_ty")
    u = (cos * xs + sin * ys) / scale
    v = (-sin * xs + cos * ys) / scale
    px = 2.0 / image_size  # one pixel in normalised units, for edge softness

    body = _sig((1 - (u / patient("body_w")) ** 2 - (v / 1.35) ** 2) / (6 * px))
    lung_x, lung_y = patient("lung_x"), patient("lung_y")
    lung_ax = patient("lung_ax")
    lung_ay = patient("lung_ay") * image("image_inspiration")  # this breath's lung height

    lungs = np.zeros_like(u)
    lung_ellipse = {}
    lung_by_side = {}
    for side in (-1.0, 1.0):
        cu = side * lung_x
        ellipse = ((u - cu) / lung_ax) ** 2 + ((v - lung_y) / lung_ay) ** 2
        # Patient's left hemidiaphragm (image right, side=+1) sits a little lower than the right.
        base = lung_y + 0.78 * lung_ay + (patient("diaphragm_drop") if side > 0 else 0.0)
        dome = base - patient("dome_h") * np.clip(1 - ((u - cu) / (1.1 * lung_ax)) ** 2, 0, 1)
        lung = _sig((1 - ellipse) / 0.05) * _sig((dome - v) / (1.5 * px))
        lung_ellipse[side] = ellipse
        lung_by_side[side] = lung
        lungs += lung

    heart_scale = patient("heart_scale") * np.where(is_ap, np.float32(1.08), np.float32(1.0))
    # The heart sits low between the lungs, bulging to the patient's left (image right).
    hu, hv = u - 0.06, v - (lung_y + patient("heart_y") * lung_ay)
    heart = _sig((1 - (hu / (0.25 * heart_scale)) ** 2 - (hv / 0.25) ** 2) / 0.06)
    mediastinum = _sig((0.085 - np.abs(u)) / (2 * px)) * _sig((0.2 - v) / 0.05)
    displaced = np.maximum(heart, mediastinum)

    # Lung markings: a smooth oriented texture, fading towards the periphery.
    angle, freq, phase = (cohort[k][image_ids].astype(np.float32)[:, :, None, None]
                          for k in ("image_marking_angle", "image_marking_freq", "image_marking_phase"))
    waves = np.cos(freq * (np.cos(angle) * u[:, None] + np.sin(angle) * v[:, None]) + phase)
    markings = waves.mean(axis=1) * np.clip(1.2 - np.abs(u) / 0.45, 0.2, 1.0)

    labels = cohort["labels"][pid]
    has = {name: labels[:, j].astype(bool)[:, None, None] for j, name in enumerate(LABEL_NAMES)}

    # Pneumothorax: apical-lateral rim of one lung loses markings and gets darker behind a pleural line.
    ptx_side = cohort["ptx_side"][pid][:, None, None]
    ptx_ellipse = np.where(ptx_side > 0, lung_ellipse[1.0], lung_ellipse[-1.0])
    ptx_lung = np.where(ptx_side > 0, lung_by_side[1.0], lung_by_side[-1.0])
    inner = (1 - patient("ptx_gap")) ** 2
    upper = _sig((lung_y + 0.15 - v) / 0.08)
    ptx_region = has["pneumothorax"] * ptx_lung * upper * _sig((ptx_ellipse - inner) / 0.04)
    pleural_line = (has["pneumothorax"] * ptx_lung * upper
                    * np.exp(-(((ptx_ellipse - inner) / 0.035) ** 2)))

    # Effusion: fluid fills the lung base up to a level that climbs along the lateral wall (meniscus).
    fluid = np.zeros_like(u)
    effusion_side = cohort["effusion_side"][pid][:, None, None]
    for side in (-1.0, 1.0):
        on_side = has["effusion"] & ((effusion_side == side) | (effusion_side == 0))
        cu = side * lung_x
        lateral = np.clip(side * (u - cu) / lung_ax, 0, 1.2)
        level = lung_y + 0.78 * lung_ay - patient("effusion_height") - 0.15 * lateral ** 2
        fluid += on_side * lung_by_side[side] * _sig((v - level) / (2 * px))

    nodule_side = patient("nodule_side")
    nu = nodule_side * lung_x + patient("nodule_du") * lung_ax
    nv = lung_y + patient("nodule_dv") * lung_ay
    nodule = has["nodule"] * patient("nodule_amp") * np.exp(
        -((u - nu) ** 2 + (v - nv) ** 2) / (2 * patient("nodule_r") ** 2))

    ribs, thorax, spine, clavicles = _bones(u, v, patient, lung_x=lung_x, lung_y=lung_y, lung_ax=lung_ax,
                                            lung_ay=lung_ay, px=px)

    aerated = lungs * (1 - displaced) * (1 - np.clip(fluid, 0, 1))
    density = (body * (1.0 + 0.05 * heart)
               - 0.75 * aerated
               - RENDER["ptx_lucency"] * ptx_region * (1 - displaced)
               + 0.04 * markings * aerated * (1 - ptx_region)
               + RENDER["pleural_line"] * pleural_line * (1 - displaced)
               + 0.12 * ribs * thorax * body
               + 0.35 * spine * body
               + 0.4 * clavicles * body
               + nodule * lungs)

    density = np.maximum(density, 0)
    # Exposure: transmitted fraction exp(-mu * density), displayed inverted (dense = bright).
    mu = image("image_mu")
    shown = (1 - np.exp(-mu * density)) / (1 - np.exp(-mu * 1.8))
    shown = np.clip(shown * (1 + image("image_heel") * y[None]), 0, None) ** image("image_gamma")
    shown = image("image_offset") + image("image_gain") * shown
    noise = np.stack([np.random.default_rng(s).standard_normal((image_size, image_size), np.float32)
                      for s in cohort["image_noise_seed"][image_ids]])
    shown = shown + image("image_noise") * noise
    margins = cohort["image_collimation"][image_ids].astype(np.float32)[:, :, None, None]
    inside = (_sig((x[None] - (-1 + margins[:, 0])) / px) * _sig(((1 - margins[:, 1]) - x[None]) / px)
              * _sig((y[None] - (-1 + margins[:, 2])) / px) * _sig(((1 - margins[:, 3]) - y[None]) / px))
    shown = inside * shown + (1 - inside) * np.float32(0.92)
    marker = ((np.abs(x[None] - image("image_marker_x")) < 0.05)
              & (np.abs(y[None] - image("image_marker_y")) < 0.06))
    shown = np.clip(np.where(marker, np.float32(1.0), shown), 0, 1)
    full_scale = (2.0 ** cohort["bits_stored"][pid] - 1)[:, None, None]
    return np.round(shown * full_scale).astype(np.uint16)
