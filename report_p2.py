"""The report's P2 part: the eta grid, slerp and linear interpolation strips, MSE against the ground truth."""

import numpy as np

import p2_ddim
import p2_interpolate
from report_common import figure, require, skipped_step, table
from utils import load_rgb


def p2_part(context):
    out = context.out / "p2"
    face = context.data / "face"
    noise = require(face / "noise", "the face noise folder", "download the data with `bash hw2_download.sh`")
    unet = require(context.args.face_unet or face / "UNet.pt", "the face UNet", "download the data or pass --face-unet")
    context.model("P2 face UNet", unet)
    gt = face / "GT"
    faces = out / "faces"
    steps = context.steps_flag(context.settings.p2_steps)
    p2_ddim.main([str(noise), str(faces), str(unet), "--figures", str(out), *steps, *context.seed_flag(),
                  *context.device_flag()])
    interpolation = out / "interpolation"
    p2_interpolate.main([str(noise), str(interpolation), str(unet), *steps, *context.device_flag()])
    eta_grid, slerp, linear = out / "eta_grid.png", interpolation / "slerp.png", interpolation / "linear.png"
    num_steps = context.settings.p2_steps or p2_ddim.DEFAULT_STEPS
    lines = [
        f"DDIM with {num_steps} steps on `{unet}`, images normalised per image like the course's ground truth.", "",
        "### Faces for different eta", "",
        f"Rows eta = {', '.join(f'{eta:g}' for eta in p2_ddim.FIGURE_ETAS)}; columns the noises 00.pt-"
        f"{p2_ddim.FIGURE_NOISES - 1:02d}.pt. eta = 0 is deterministic DDIM; eta = 1 gives DDPM's posterior variance; "
        "larger eta adds more fresh noise at each step, so the image drifts away from the deterministic one.", "",
        figure(context.out, eta_grid, "eta grid"), "",
        "### Interpolation between 00.pt and 01.pt", "",
        f"alpha = {', '.join(f'{alpha:.1f}' for alpha in p2_interpolate.ALPHAS)}. Slerp keeps the norm a Gaussian "
        "sample of this size has; linear interpolation shrinks it in the middle (two independent N(0, I) noises "
        "averaged have about 0.71 of a sample's norm), off the distribution the model was trained on, which gives "
        "washed-out, blurry middle frames.", "",
        figure(context.out, slerp, "slerp strip"), "", figure(context.out, linear, "linear strip"), "",
        "### MSE against the ground truth (eta = 0, 0-255 scale)", ""]
    if gt.is_dir():
        names = [path.stem for path in p2_ddim.noise_paths(noise)]
        references = p2_ddim.load_ground_truth(gt, names, np.asarray(load_rgb(faces / f"{names[0]}.png")).shape[:2])
        errors = [p2_ddim.mse_255(np.asarray(load_rgb(faces / f"{name}.png")), reference)
                  for name, reference in zip(names, references)]
        rows = [[f"{name}.png", f"{error:.4f}"] for name, error in zip(names, errors)]
        rows.append(["mean", f"{np.mean(errors):.4f}"])
        if num_steps != p2_ddim.DEFAULT_STEPS:
            lines += [f"These images took {num_steps} steps, not the {p2_ddim.DEFAULT_STEPS} the ground truth was made "
                      f"with, so the errors are large.", ""]
        lines += [table(["image", "MSE"], rows), ""]
    else:
        reason = f"no ground-truth folder {gt}"
        lines += skipped_step(context, "P2 MSE table", reason)
    return "\n".join(lines)
