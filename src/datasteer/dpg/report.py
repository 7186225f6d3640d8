"""Plots and the markdown report of a DPG run: curves against examples seen, the LM-head slice next to its
pattern (a strip and an animated GIF), a headline per arm, and for a QR-code pattern the final LM-head image
decoded back to its payload (OpenCV).

What to show comes from the target's declaration (`config.target.readout`: its readout key, which way is better,
the thresholds to count examples to), never from the keys found in the metrics. LM-head images are drawn in the
pattern's own layout and sign (`LMHeadPatternSpec.image`): ink is dark whichever way the target writes it."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from datasteer.dpg.config import DPGConfig
from datasteer.dpg.targets import LMHeadPatternSpec, Readout
from datasteer.errors import MissingDependencyError, optional_import
from datasteer.plotting import pyplot
from datasteer.runs import atomic_write_text

ARM_COLOURS = {"dpg": "#d62728", "naive": "#1f77b4"}


def validation_series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = (row.get("validation") or {}).get(key)
        if isinstance(value, (int, float)):
            xs.append(row["examples_seen"])
            ys.append(float(value))
    return xs, ys


def first_reaching(rows: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    """Examples seen when the validation readout first reaches `threshold` (None: never)."""
    for x, y in zip(*validation_series(rows, key)):
        if y >= threshold:
            return x
    return None


def curves(arms: list[Any], readout: Readout, path: Path) -> Path:
    """Validation Phi and readout (and each step's training-batch readout, faded) against examples seen."""
    plt = pyplot()
    key = readout.key
    panels = ["phi"] + ([key] if key else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, arm in enumerate(arms):
            c = ARM_COLOURS.get(arm.arm, f"C{i + 2}")
            # each step's own target (trained on that step's rollouts): phi at the top level, the rest in readout
            values = [(r["examples_seen"], r.get("phi") if panel == "phi" else (r.get("readout") or {}).get(panel))
                      for r in arm.rows]
            points = [(x, y) for x, y in values if y is not None]
            if points:
                ax.plot(*zip(*points), color=c, alpha=0.25, lw=1, label=f"{arm.arm}: the step's batch")
            vx, vy = validation_series(arm.rows, panel)
            ax.plot(vx, vy, color=c, marker="o", ms=3, lw=2, label=f"{arm.arm}: validation")
        if panel == key:
            for t in readout.thresholds:
                ax.axhline(t, color="#444", ls=":", lw=1)
        ax.set_xlabel("examples seen (rollouts the target was trained on)")
        ax.set_title(panel if panel != "phi" else "Phi (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _snapshots(slices: list[dict[str, Any]], count: int = 6) -> list[dict[str, Any]]:
    if len(slices) <= count:
        return slices
    picks = sorted({round(i * (len(slices) - 1) / (count - 1)) for i in range(count)})
    return [slices[i] for i in picks]


def slice_images(spec: LMHeadPatternSpec, arm: Any) -> list[tuple[int, Any]]:
    """(step, sign of the slice's change in the pattern's layout and sign: +1 = ink) at each validation of `arm`."""
    import numpy as np

    return [(shot["step"], np.sign(spec.image(np.asarray(shot["delta"], dtype=float)))) for shot in arm.slices]


def image_pixels(image: Any) -> Any:
    """An image of signs as grey levels, as the GIF draws it: ink (+1) black, background (-1) white, 0 grey."""
    import numpy as np

    return np.where(image > 0, 0, np.where(image < 0, 255, 160)).astype(np.uint8)


def qr_picture(image: Any, scale: int = 8, quiet: int = 4) -> Any:
    """An LM-head image as a QR reader wants it: `image_pixels`, a quiet zone of `quiet` white modules around it,
    `scale` pixels per module."""
    import numpy as np

    pixels = np.pad(image_pixels(np.asarray(image)), quiet, constant_values=255)
    return np.kron(pixels, np.ones((scale, scale), dtype=np.uint8))


def decode_qr(image: Any) -> str | None:
    """The payload OpenCV's QRCodeDetector reads from an LM-head image (+1 = dark module), or None when it finds or
    decodes no code. Needs opencv (`pip install 'datasteer[qr]'`)."""
    cv2 = optional_import("cv2", "decoding the QR code of an LM-head image", "pip install 'datasteer[qr]'")
    text, _, _ = cv2.QRCodeDetector().detectAndDecode(qr_picture(image))
    return text or None


def qr_section(spec: LMHeadPatternSpec, arms: list[Any]) -> tuple[list[str], dict[str, Any]]:
    """The report's lines on a QR-code pattern: each arm's final LM-head image decoded back to its payload."""
    payload = spec.pattern.qr
    pattern = spec.pattern.render().numpy()
    lines = ["## QR code", "", f"The pattern is the QR code of `{payload}` ({pattern.shape[0]} x {pattern.shape[1]}, "
             f"error level {spec.pattern.qr_error}). Each arm's final LM-head image (the sign of the slice's change "
             "at its last validation, ink dark) read by OpenCV's QRCodeDetector:", ""]
    decoded: dict[str, Any] = {}
    for arm in arms:
        images = slice_images(spec, arm)
        if not images:
            continue
        step, image = images[-1]
        wrong = int((image != pattern).sum())
        try:
            text = decode_qr(image)
        except MissingDependencyError as err:
            lines.append(f"- {arm.arm}: not decoded ({err})")
            continue
        decoded[arm.arm] = {"step": step, "decoded": text, "matches": text == payload, "wrong_pixels": wrong}
        verdict = ("the payload" if text == payload else "no code found" if text is None else "another text")
        lines.append(f"- {arm.arm}, step {step}: {wrong} of {pattern.size} pixels wrong; decoded "
                     f"{text!r} ({verdict})")
    return lines, decoded


def lm_head_strip(arms: list[Any], spec: LMHeadPatternSpec, path: Path) -> Path:
    """The pattern, then sign(P - P0) of the validation target's slice at chosen steps, one row per arm."""
    plt = pyplot()
    import numpy as np

    pattern = spec.pattern.render().numpy()
    with_slices = [a for a in arms if a.slices]
    cols = 1 + max(len(_snapshots(a.slices)) for a in with_slices)
    fig, axes = plt.subplots(len(with_slices), cols, figsize=(1.5 * cols, 2.3 * len(with_slices)), squeeze=False)
    target = np.asarray(pattern)
    for r, arm in enumerate(with_slices):
        axes[r][0].imshow(-target, cmap="gray", vmin=-1, vmax=1)
        axes[r][0].set_title("pattern", fontsize=8)
        axes[r][0].set_ylabel(arm.arm)
        shots = _snapshots(slice_images(spec, arm))
        for c in range(1, cols):
            ax = axes[r][c]
            if c - 1 < len(shots):
                step, delta = shots[c - 1]
                accuracy = float((delta == target).mean())
                ax.imshow(-delta, cmap="gray", vmin=-1, vmax=1)
                ax.set_title(f"step {step}\n{accuracy:.0%}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("LM-head slice: sign of the change after fine-tuning on validation rollouts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lm_head_gif(arm: Any, spec: LMHeadPatternSpec, path: Path, scale: int = 24) -> Path:
    """Animated GIF: pattern (left) and the slice's sign(P - P0) (right) at every validation."""
    import numpy as np
    from PIL import Image, ImageDraw

    target = spec.pattern.render().numpy()
    frames = []
    for step, delta in slice_images(spec, arm):
        both = np.concatenate([target, np.zeros((target.shape[0], 1)), delta], axis=1)
        pixels = image_pixels(both)
        image = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
        canvas = Image.new("L", (image.width, image.height + 18), 255)
        canvas.paste(image, (0, 18))
        ImageDraw.Draw(canvas).text((2, 2), f"{arm.arm} step {step}: {(delta == target).mean():.0%}", fill=0)
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=400, loop=0)
    return path


TAIL = 5  # validations averaged into `last_mean`: the end of a run, less at the mercy of one validation's draw


def summarise(arms: list[Any], readout: Readout) -> dict[str, Any]:
    key = readout.key
    out: dict[str, Any] = {"readout": key, "arms": {}}
    for arm in arms:
        xs, ys = validation_series(arm.rows, key) if key else ([], [])
        _, phis = validation_series(arm.rows, "phi")
        entry: dict[str, Any] = {"steps": arm.rows[-1]["step"] if arm.rows else 0,
                                 "examples_seen": arm.rows[-1]["examples_seen"] if arm.rows else 0}
        untrained = (arm.rows[0].get("untrained") or {}) if arm.rows else {}
        if key in untrained and readout.untrained:
            entry["untrained"] = untrained[key]
        if ys:
            best = max(ys) if readout.higher_is_better else min(ys)
            tail = ys[-TAIL:]
            entry.update(start=ys[0], final=ys[-1], best=best, change=ys[-1] - ys[0],
                         last_mean=sum(tail) / len(tail), last_count=len(tail))
        if phis:
            entry.update(phi_start=phis[0], phi_final=phis[-1])
        if readout.thresholds:
            entry["examples_to"] = {f"{t:.0%}": first_reaching(arm.rows, key, t) for t in readout.thresholds}
        out["arms"][arm.arm] = entry
    return out


def _fmt(value: Any, none: str = "not reached") -> str:
    """A table cell; `none` for a missing value (a threshold not reached, or "n/a" where the readout has none)."""
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.4g}" if not math.isnan(value) else "nan"
    return str(value)


def headline_table(summary: dict[str, Any], readout: Readout) -> list[str]:
    """The markdown table of `summarise`: one row per arm, a column per threshold the readout declares."""
    key = readout.key
    header = ["arm", "examples seen", f"{key} of the untrained target", f"{key} at step 0", f"{key} final",
              f"{key} best", f"{key}, mean of the last {TAIL} validations", "Phi at step 0", "Phi final"]
    header += [f"examples to {t:.0%}" for t in readout.thresholds]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, entry in summary["arms"].items():
        cells = [arm, entry["examples_seen"], entry.get("untrained"), entry.get("start"), entry.get("final"),
                 entry.get("best"), entry.get("last_mean"), entry.get("phi_start"), entry.get("phi_final")]
        reached = [entry["examples_to"][f"{t:.0%}"] for t in readout.thresholds]
        lines.append("| " + " | ".join([_fmt(c, "n/a") for c in cells] + [_fmt(c) for c in reached]) + " |")
    return lines


PHASES = ("sampling", "reward", "policy_logprobs", "training_step", "validation", "wall")


def phase_medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per policy step of each phase (`records.PhaseClock`) over an arm's metrics rows, each phase
    over the steps that had it: validation over every validation (step 0's too), the others over the policy steps
    (step 0's wall time is the arm's set-up); {} when the rows carry no times (runs made before they were
    recorded)."""
    timed = [r for r in rows if isinstance(r.get("seconds"), dict)]
    medians = {}
    for phase in PHASES:
        values = [r["seconds"][phase] for r in timed if phase in r["seconds"] and (r["step"] or phase == "validation")]
        if values:
            medians[phase] = statistics.median(values)
    return medians


def phase_table(arms: list[Any]) -> list[str]:
    """`phase_medians` per arm as a markdown section; empty when no arm has times."""
    lines = []
    for arm in arms:
        medians = phase_medians(arm.rows)
        if not medians:
            continue
        steps = sum(1 for r in arm.rows if r.get("step") and isinstance(r.get("seconds"), dict))
        cells = [f"{medians[phase]:.3g}" if phase in medians else "" for phase in PHASES]
        lines.append(f"| {arm.arm} | {steps} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["## Time per policy step", "",
            "Median wall seconds of each phase (`seconds` in metrics.jsonl): sampling the rollouts, the reward (the "
            "target's fine-tuning), the policy's log-probability forward passes, TRL's whole training step (these "
            "and the backward pass), validation (steps that validate), and the wall time between rows.", "",
            "| arm | steps | " + " | ".join(PHASES) + " |", "|" + "---|" * (len(PHASES) + 2), *lines, ""]


def samples_section(arms: list[Any], readout: Readout, width: int = 160) -> list[str]:
    """Per arm, the rollout each validation records (the generator's answer to the first held-out prompt, drawn
    afresh at each validation) beside the readout: what the steering did to the data, before and after."""
    key = readout.key or "phi"
    lines = []
    for arm in arms:
        rows = [r for r in arm.rows if isinstance((r.get("validation") or {}).get("sample"), str)]
        if not rows:
            continue
        lines += [f"**{arm.arm}**", "", f"| step | examples seen | {key} | rollout |", "|---|---|---|---|"]
        for row in rows:
            text = " ".join(row["validation"]["sample"].split())[:width].replace("|", "\\|").replace("`", "'")
            lines.append(f"| {row['step']} | {row['examples_seen']} | {_fmt(row['validation'].get(key))} | "
                         f"`{text}` |")
        lines.append("")
    if not lines:
        return []
    return ["## Sample rollouts", "", "The rollout each validation records: the generator's answer to the first "
            "held-out prompt, drawn afresh at every validation (step 0: the untrained generator).", "", *lines]


def policy_steps(grpo: Any) -> str:
    """'N policy steps', and the generator updates they take when a batch of rollouts makes several."""
    block = grpo.steps_per_generation * grpo.num_iterations
    if block == 1:
        return f"{grpo.max_steps} policy steps"
    return f"{grpo.max_steps // block} policy steps ({grpo.max_steps} generator updates, {block} per batch)"


def write_dpg_report(config: DPGConfig, out: Path, arms: list[Any]) -> tuple[Path, dict[str, Any]]:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    readout = config.target.readout
    summary = summarise(arms, readout)
    grpo, training = config.grpo, config.training
    images = [curves(arms, readout, plots / "curves.png")]
    qr_lines: list[str] = []
    spec = config.target
    if isinstance(spec, LMHeadPatternSpec) and any(a.slices for a in arms):
        images.append(lm_head_strip(arms, spec, plots / "lm_head.png"))
        for arm in arms:
            if arm.slices:
                images.append(lm_head_gif(arm, spec, plots / f"lm_head-{arm.arm}.gif"))
        if spec.pattern.qr is not None:
            qr_lines, summary["qr"] = qr_section(spec, arms)
    lines = [f"# DPG: {config.name}", "", config.description.strip(), "",
             f"Generator `{config.generator.model}`, target `{config.target.model}`, target kind "
             f"`{config.target.kind}`; {policy_steps(grpo)} of {grpo.prompts_per_step} prompts x "
             f"{grpo.num_generations} rollouts; the target is fine-tuned with {training.optimizer} "
             f"(lr {training.learning_rate}, batches of {training.batch_size}) from its initial weights at every "
             "step.", "",
             "Validation: a fresh target fine-tuned on the generator's rollouts for held-out prompts "
             "(step 0 = the untrained generator, i.e. data nobody steered; the untrained target = before any "
             "fine-tuning).", "", "## Headline", ""]
    lines += headline_table(summary, readout)
    lines += [""] + qr_lines if qr_lines else []
    lines += [""] + phase_table(arms)
    lines += samples_section(arms, readout)
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in images]
    lines += ["", "## Files", "", "Per arm: `metrics.jsonl` (every step), `slices.jsonl` (LM-head slices at "
              "validations), `checkpoints/`, `model/` (the trained generator), `manifest.json`.", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(str(x) for x in lines))
    return report, summary
