"""Which metrics an experiment can compute with the weights it was given (missing weights are reported
as missing, never replaced by something else under the same name)."""
from __future__ import annotations

from training.experiment_config import Experiment


def metric_plan(exp: Experiment) -> dict:
    """Which metrics this run can compute: ``{id: {label, available, ...}}``; missing weights are
    reported as missing, never replaced."""
    m = exp.metrics
    out = {}
    if m.clip_iqa_weights is not None:
        out["clip_iqa"] = {"label": "CLIP-IQA", "available": True, "higher_is_better": True, "backbone": m.clip_iqa_model,
                           "prompts": [f"A good photo of a {exp.class_name}.", f"A bad photo of a {exp.class_name}."]}
    else:
        out["clip_iqa"] = {"label": "CLIP-IQA", "available": False, "higher_is_better": True,
                           "missing": "no CLIP weights: set [metrics] clip_iqa_weights (an open_clip file for "
                                      f"{m.clip_iqa_model!r})"}
    fid_label = "FID" if m.fid_features == 2048 else f"FD (inception-v3 pool {m.fid_features})"
    kid_label = "KID" if m.fid_features == 2048 else f"KD (inception-v3 pool {m.fid_features})"
    if m.inception_weights is not None:
        out["fid"] = {"label": fid_label, "available": True, "higher_is_better": False, "extractor": "inception-v3",
                      "features": m.fid_features}
        out["kid"] = {"label": kid_label, "available": True, "higher_is_better": False, "extractor": "inception-v3"}
    else:
        why = "no Inception weights: set [metrics] inception_weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
        out["fid"] = {"label": fid_label, "available": False, "higher_is_better": False, "missing": why}
        out["kid"] = {"label": kid_label, "available": False, "higher_is_better": False, "missing": why}
    if m.extractor is not None:
        out["fd"] = {"label": f"FD ({m.extractor})", "available": True, "higher_is_better": False, "extractor": m.extractor}
        out["kd"] = {"label": f"KD ({m.extractor})", "available": True, "higher_is_better": False, "extractor": m.extractor}
        if m.fd_pca_dims:
            out["fd_pca"] = {"label": f"FD ({m.extractor}, {m.fd_pca_dims} PCs)", "available": True,
                             "higher_is_better": False, "extractor": m.extractor, "dims": m.fd_pca_dims,
                             "definition": f"FD after projecting the samples' and the reference's features onto the "
                                           f"reference's first {m.fd_pca_dims} principal axes (lord_ops.metrics."
                                           f"projected_frechet_distance): few samples estimate a few dimensions "
                                           f"far better than the extractor's full feature size"}
    if m.subject_class is not None:
        out["subject_acc"] = {"label": f"Subject accuracy ({m.extractor})", "available": True, "higher_is_better": True,
                              "extractor": m.extractor, "subject_class": m.subject_class,
                              "definition": f"share of the generated images that {m.extractor} classifies as "
                                            f"{m.subject_class!r}"}
    # texture metrics need no weights: what an ACE-type attack leaves in the samples
    target = exp.attack_target.name if exp.attack_target is not None else "the pack's high-contrast pattern"
    out["target_corr"] = {"label": "Target correlation", "available": True, "higher_is_better": False,
                          "target": target,
                          "definition": f"mean Pearson correlation of the generated images (grey) with the ACE target "
                                        f"({target}) at the image size (lord_ops.metrics.pattern_correlation): +1 "
                                        f"the target itself, ~0 unrelated content"}
    out["hf_spectrum"] = {"label": "HF spectrum distance", "available": True, "higher_is_better": False,
                          "low_cut": m.hf_low_cut,
                          "definition": f"mean |difference| of the radially averaged log10 power spectra of the "
                                        f"generated and the reference images at or above {m.hf_low_cut:g} x Nyquist "
                                        f"(lord_ops.metrics.high_frequency_distance; 0.3 = a factor 2 in power); "
                                        f"'signed' > 0: more fine-texture energy than the reference"}
    if m.heldout_images is not None:
        out["heldout_loss"] = {"label": "Held-out denoising loss", "available": True, "higher_is_better": False,
                               "images": str(m.heldout_images), "timesteps": list(m.heldout_timesteps),
                               "draws": m.heldout_draws,
                               "definition": "mean native denoising loss of the fine-tuned model (base + LoRA, "
                                             "+ its Stage-1 adapter) on clean subject images it never trained "
                                             "on, over a fixed grid of timesteps and seeded noise draws"}
    return out
