"""Plots and tables of the toy experiment (for docs/EXPERIMENTS.md) from the files the stages
wrote under ``models/toy_faces``.

    python -m pv_jax.toy.report --out models/toy_faces
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pv_jax.evaluation.run import fmt
from pv_jax.train.metrics import read_metrics

PAPER = {"full": 0.696, "no_face": 0.643, "no_image": 0.556}  # ArcFace ID sim, paper Table 3


def _smooth(y: np.ndarray, k: int = 5) -> np.ndarray:
    if len(y) < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_losses(out: Path, runs: dict[str, Path]) -> Path:
    """Loss curves: the three toy base stages, then every PhotoVerse loss term per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ("diffusion", "face", "text_reg", "image_reg")
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (stage, key) in zip(
        axes[0],
        [("vae", "l1"), ("unet", "loss"), ("vision", "loss"), ("vision", "top1")],
        strict=True,
    ):
        path = out / f"{stage}_metrics.jsonl"  # the stage's copy, beside its model
        rows = read_metrics(path) if path.is_file() else []
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_title(f"stage {stage}: {key}")
        ax.set_xlabel("step")
    for ax, term in zip(axes[1], terms, strict=True):
        for name, workdir in runs.items():
            rows = [r for r in read_metrics(workdir, by_step=True) if term in r]
            if rows:
                steps = np.array([r["step"] for r in rows])
                y = _smooth(np.array([r[term] for r in rows]))
                ax.plot(steps[len(steps) - len(y) :], y, label=name)
        ax.set_title(f"PhotoVerse: {term}")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_ablation(out: Path, report: dict) -> Path:
    """Bars per run: own-reference, other-photo, other-people similarity and identification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    keys = [
        ("own_mean", "own reference"),
        ("other_photo_mean", "other photo, same person"),
        ("other_people_mean", "other people (mean)"),
        ("other_people_max", "other people (max)"),
    ]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(20, 4.5))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        vals = [report["runs"][n]["identity"]["all"].get(key, np.nan) for n in names]
        a1.bar(np.arange(len(names)) + k * width, vals, width, label=label)
    a1.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=15, fontsize=8)
    a1.set_ylabel("dlib cosine (held-out people)")
    a1.set_ylim(0.7, 1.0)  # dlib cosines of faces: different people ~0.83, same person ~0.96
    a1.legend(fontsize=8)
    ident = [report["runs"][n]["identity"]["all"].get("identification", np.nan) for n in names]
    a2.bar(names, ident)
    chance = report["runs"][names[0]]["identity"]["all"]["chance"]
    a2.axhline(chance, color="k", ls="--", label=f"chance {chance:.3f}")
    a2.axhline(10 * chance, color="r", ls=":", label="10x chance (target)")
    a2.set_ylabel("identification (top-1 own reference)")
    a2.tick_params(axis="x", rotation=15, labelsize=8)
    a2.legend(fontsize=8)
    gapped = [n for n in names if "x0_gap" in report["runs"][n]]
    if gapped:
        bands = list(report["runs"][gapped[0]]["x0_gap"])
        w = 0.8 / len(bands)
        for k, band in enumerate(bands):
            rows = [report["runs"][n]["x0_gap"][band] for n in gapped]
            y = np.array([r["gap"] for r in rows]) * 100
            err = np.abs(np.array([r["ci95"] for r in rows]).T * 100 - y)
            a3.bar(np.arange(len(gapped)) + k * w, y, w, yerr=err, capsize=3, label=f"t {band}")
        a3.set_xticks(np.arange(len(gapped)) + 0.4 - w / 2, gapped, fontsize=8)
        a3.axhline(0, color="k", lw=0.8)
        a3.set_ylabel("x0 error: shuffled / own reference - 1 (%)")
        a3.set_title("conditioning gain on the held-out people (95% CI)", fontsize=9)
        a3.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ablation.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def tables(report: dict) -> str:
    """Markdown: identity per run (all prompts), then prompt following per run."""
    lines = [
        "| run | CFG / eta | images | face rate | own ref (± std) | other photo "
        "| other people mean / max | identification (chance) | paper ArcFace ID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        m = r["identity"]["all"]
        sampling = r.get("sampling")
        cfg = f"{sampling['guidance']:g} / {sampling['eta']:g}" if sampling else ""
        lines.append(
            f"| {name} | {cfg} | {m['images']} | {m['face_rate']:.2f} | "
            f"{fmt(m.get('own_mean'))} ± {fmt(m.get('own_std'))} | "
            f"{fmt(m.get('other_photo_mean'))} | "
            f"{fmt(m.get('other_people_mean'))} / {fmt(m.get('other_people_max'))} | "
            f"{fmt(m.get('identification'))} ({m['chance']:.3f}) | {PAPER.get(name, '')} |"
        )
    attrs = None
    pf_lines = []
    for name, r in report["runs"].items():
        pf = r.get("prompt_following")
        if not pf:
            continue
        attrs = attrs or list(pf)
        cells = " | ".join(
            f"{pf[a]['with_word']:.2f} vs {pf[a]['without_word']:.2f}" for a in attrs
        )
        pf_lines.append(f"| {name} | {cells} |")
    if attrs:
        lines += [
            "",
            "Prompt following: fraction of images showing the attribute, with the word "
            'vs without it ("a photo of S*").',
            "",
            "| run | " + " | ".join(attrs) + " |",
            "|---|" + "---|" * len(attrs),
            *pf_lines,
        ]
    return "\n".join(lines) + "\n"


def gain_table(report: dict) -> str:
    """Markdown: each run's conditioning gain on the held-out people per band of t: the x0 gap
    (shuffled vs own reference) with its 95% interval, and the own reference against the frozen
    base (``pv_jax.toy.diagnose.x0_gap``)."""
    lines = []
    for name, r in report["runs"].items():
        gap = r.get("x0_gap")
        if not gap:
            continue
        if not lines:
            lines = [
                "| run | "
                + " | ".join(f"x0 gap t {b} [95% CI]" for b in gap)
                + " | own reference vs frozen base, t "
                + " / ".join(gap)
                + " |",
                "|---|" + "---|" * (len(gap) + 1),
            ]
        cells = " | ".join(
            f"{g['gap'] * 100:+.2f}% [{g['ci95'][0] * 100:+.2f}, {g['ci95'][1] * 100:+.2f}]"
            for g in gap.values()
        )
        base = " / ".join(f"{g['gain_over_base'] * 100:+.1f}%" for g in gap.values())
        lines.append(f"| {name} | {cells} | {base} |")
    return "\n".join(lines) + "\n" if lines else ""


def tuning_table(tunes: dict[str, dict], release: str | None = None) -> str:
    """Markdown: each run's guidance sweep on the validation people (its choice in bold) and
    its validation x0 gap at t >= 600 (the release's rule)."""
    lines = [
        "| run | guidance | face rate | own ref | other people mean | identification (chance) "
        "| grayscale / red / blue with the word | val x0 gap t >= 600 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, tune in tunes.items():
        gap = tune.get("val_x0_gap", {}).get("600-1000")
        mark_run = f"{name} (released)" if name == release else name
        for g, m in tune["sweep"].items():
            pf = m.get("prompt_following", {})
            words = " / ".join(f"{v['with_word']:.2f}" for v in pf.values())
            chosen = float(g) == tune["guidance"]
            gap_cell = f"{gap['gap'] * 100:+.2f}%" if gap and chosen else ""
            lines.append(
                f"| {mark_run} | {'**' + g + '**' if chosen else g} | {m['face_rate']:.2f} | "
                f"{fmt(m.get('own_mean'))} | {fmt(m.get('other_people_mean'))} | "
                f"{fmt(m.get('identification'))} ({m['chance']:.3f}) | {words} | "
                f"{gap_cell} |"
            )
    return "\n".join(lines) + "\n"


BANDS = ("0-300", "300-600", "600-1000")
# The rung-0 runs drawn in colour (the others in grey), with their legend.
RUNG0_NAMED = {
    "baseline": "paper's init, image branch alone",
    "oracle": "  + oracle tokens (VAE latents)",
    "fusion": "paper's init, random fusion",
    "gs11": "paper's init, both branches, no fusion",
    "fusion_zero": "zero W_v^S, random fusion",
    "gs02_zero": "zero W_v^S, image branch alone",
    "gs11_zero": "zero W_v^S, both branches, no fusion",
    "gs11_zero_seed1": "  the same, seed 1",
}


def ladder_table(rows: list[dict]) -> str:
    """Rung 0 (``ladder/rung0.jsonl``): each run's x0 gap per band at its last step, with the
    95% interval of the middle band and the own reference's gain over the frozen base."""
    lines = [
        "| run | setting | steps | x0 gap " + " / ".join(BANDS) + " | 95% CI (300-600) "
        "| gain over base " + " / ".join(BANDS) + " | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        last = r["history"][-1]
        gap = last["x0_gap"]
        gain = " / ".join(
            f"{gap[b]['gain_over_base'] * 100:+.1f}%" if "gain_over_base" in gap[b] else "-"
            for b in BANDS
        )
        lo, hi = gap["300-600"]["ci95"]
        setting = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items())
        extra = [x for x in ("fusion" if r.get("fusion") else "",) if x]
        if r.get("repeat", 1) > 1:
            extra.append(f"batch x{r['repeat']}")
        if r.get("oracle"):
            extra.append("oracle tokens")
        setting = ", ".join(filter(None, [setting, *extra])) or "the paper's (copy init)"
        lines.append(
            f"| {r['name']} | {setting} | {last['step']} | "
            + " / ".join(f"{gap[b]['gap'] * 100:+.1f}%" for b in BANDS)
            + f" | [{lo * 100:+.1f}, {hi * 100:+.1f}] | {gain} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def gap_curve_table(rows: list[dict]) -> str:
    """Rung 2 (``ladder/gap_curves.jsonl``): per run, split and checkpoint, the x0 gap per band
    with the 95% interval at t >= 600, and the own reference's gain over the frozen base."""
    lines = [
        "| run | people | step | x0 gap " + " / ".join(BANDS) + " | 95% CI (600-1000) "
        "| gain over base " + " / ".join(BANDS) + " |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["run"], r["split"] != "val", r["step"])):
        gap = r["x0_gap"]
        lo, hi = gap["600-1000"]["ci95"]
        lines.append(
            f"| {Path(r['run']).name} | {r['split']} ({r['photos']}) | {r['step']} | "
            + " / ".join(f"{gap[b]['gap'] * 100:+.2f}%" for b in BANDS)
            + f" | [{lo * 100:+.2f}, {hi * 100:+.2f}] | "
            + " / ".join(f"{gap[b]['gain_over_base'] * 100:+.1f}%" for b in BANDS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _panel(ax, title: str, xlabel: str, ylabel: str, *, ref: float | None = None, **kw) -> None:
    """Title, axis labels, a dotted reference line at ``ref`` and a small legend."""
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls=":")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **kw)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_ladder(out: Path) -> Path:
    """ladder.png: rung 0's middle-band gap against steps per run; rung 2's gap on the
    validation and training people against steps per band (and with identity tokens); the
    base's face rate against continued-training steps; rung 2's gain over the frozen base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = out / "ladder"
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.6))
    for r in read_metrics(d / "rung0.jsonl"):
        h = r["history"]
        named = r["name"] in RUNG0_NAMED
        axes[0].plot(
            [x["step"] for x in h],
            [x["x0_gap"]["300-600"]["gap"] * 100 for x in h],
            marker="o" if named else None,
            color=None if named else "0.8",
            zorder=2 if named else 1,
            label=RUNG0_NAMED.get(r["name"]),
        )
    _panel(
        axes[0],
        "rung 0: 8 training photos, x0 gap t in [300, 600)",
        "step",
        "shuffled vs own x0 error (%)",
    )
    curves = d / "gap_curves.jsonl"
    if curves.is_file():
        rows = [r for r in read_metrics(curves) if r["run"].endswith("ladder")]
        for split, style in (("val", "-"), ("train", "--")):
            part = sorted((r for r in rows if r["split"] == split), key=lambda r: r["step"])
            for b in BANDS:
                axes[1].errorbar(
                    [r["step"] for r in part],
                    [r["x0_gap"][b]["gap"] * 100 for r in part],
                    yerr=np.array(
                        [
                            [
                                (r["x0_gap"][b]["gap"] - r["x0_gap"][b]["ci95"][0]) * 100,
                                (r["x0_gap"][b]["ci95"][1] - r["x0_gap"][b]["gap"]) * 100,
                            ]
                            for r in part
                        ]
                    ).T,
                    ls=style,
                    marker="o",
                    capsize=2,
                    label=f"{split} t {b}",
                )
        for run, split, style, label in (
            ("ladder_identity", "val", "k^-", "+ identity tokens: val t 600-1000"),
            ("ladder_aug", "val", "ms-", "+ identity, augmented refs (sd_v2): val t 600-1000"),
            ("ladder_aug", "train", "ms--", "+ identity, augmented refs (sd_v2): train t 600-1000"),
        ):
            part = sorted(
                (r for r in read_metrics(curves) if r["run"].endswith(run) and r["split"] == split),
                key=lambda r: r["step"],
            )
            if part:
                axes[1].plot(
                    [r["step"] for r in part],
                    [r["x0_gap"]["600-1000"]["gap"] * 100 for r in part],
                    style,
                    label=label,
                )
        val = sorted((r for r in rows if r["split"] == "val"), key=lambda r: r["step"])
        for b in BANDS:
            axes[3].plot(
                [r["step"] for r in val],
                [r["x0_gap"][b]["gain_over_base"] * 100 for r in val],
                marker="o",
                label=f"val t {b}",
            )
        _panel(
            axes[3],
            "rung 2: own reference vs the frozen base",
            "step",
            "x0 error gain over the base (%)",
            ref=0,
        )
        _panel(
            axes[1],
            "rung 2: all 709 photos (ladder recipe, identity tokens)",
            "step",
            "x0 gap (%), 95% CI",
            ref=5,
        )
    for name in ("base_curve.jsonl", "base_curve_eta1.jsonl"):  # DDIM eta 0, then eta 1
        if (d / name).is_file():
            rows = sorted(read_metrics(d / name), key=lambda r: r["step"])
            axes[2].plot(
                [r["step"] for r in rows],
                [r["val_face_rate"] for r in rows],
                "o-",
                label=f"DDIM eta {rows[0].get('eta', 0.0):g}",
            )
    _panel(
        axes[2],
        "base: face rate (64 validation seeds, CFG 3)",
        "continued-training steps (EMA)",
        "dlib face rate",
        ref=0.8,
        ylim=(0, 1),
    )
    fig.tight_layout()
    path = d / "ladder.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# The people ladder (fifth session): the identity recipe on sd_v2 trained on the first N
# training people (data.split="train[:N]"); the 709-people run is ladder_identity_v2.
PEOPLE_RUNS = {"people_177": 177, "people_354": 354, "ladder_identity_v2": 709}


def people_rows(rows: list[dict], step: int) -> dict[tuple[str, int], dict]:
    """(split, people) -> the gap_curves row of the PEOPLE_RUNS run at ``step``."""
    out = {}
    for r in rows:
        name = r["run"].rstrip("/").split("/")[-1]
        if name in PEOPLE_RUNS and r["step"] == step:
            out[(r["split"], PEOPLE_RUNS[name])] = r
    return out


def plot_people(out: Path, step: int = 5000) -> Path:
    """ladder/people.png: the x0 gap per band on the validation people and on the run's own
    training photos against the number of training people, at ``step``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = people_rows(read_metrics(out / "ladder" / "gap_curves.jsonl"), step)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, band in zip(axes[:3], BANDS, strict=True):
        for split, style in (("val", "o-"), ("train", "s--")):
            people = sorted(n for (sp, n) in rows if sp == split)
            if not people:
                continue
            gaps = [rows[(split, n)]["x0_gap"][band] for n in people]
            ax.errorbar(
                people,
                [g["gap"] * 100 for g in gaps],
                yerr=np.array(
                    [
                        [(g["gap"] - g["ci95"][0]) * 100, (g["ci95"][1] - g["gap"]) * 100]
                        for g in gaps
                    ]
                ).T,
                fmt=style,
                capsize=3,
                label=f"{split} ({'37 validation people' if split == 'val' else 'its own photos'})",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks([177, 354, 709], ["177", "354", "709"])
        _panel(
            ax, f"t in [{band.replace('-', ', ')})", "training people", "x0 gap (%), 95% CI", ref=0
        )
    val = sorted(n for (sp, n) in rows if sp == "val")
    for band in BANDS:
        axes[3].plot(
            val,
            [rows[("val", n)]["x0_gap"][band]["gain_over_base"] * 100 for n in val],
            "o-",
            label=f"t {band}",
        )
    axes[3].set_xscale("log", base=2)
    axes[3].set_xticks([177, 354, 709], ["177", "354", "709"])
    _panel(
        axes[3],
        "validation: own reference vs the frozen base",
        "training people",
        "x0 error gain over the base (%)",
        ref=0,
    )
    fig.suptitle(f"identity recipe on sd_v2, step {step}: the gap against the number of people")
    fig.tight_layout()
    path = out / "ladder" / "people.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Write losses.png, ablation.png and eval/toy_eval.md (identity, prompt following, the
    conditioning gain, the guidance sweep)."""
    p = argparse.ArgumentParser(prog="python -m pv_jax.toy.report")
    p.add_argument("--out", type=Path, default=Path("models/toy_faces"))
    p.add_argument("--work", type=Path, default=Path("toy_work"))
    p.add_argument("--ladder", action="store_true", help="only ladder/ladder.png and its table")
    args = p.parse_args(argv)
    if args.ladder:
        print(plot_ladder(args.out))
        print(plot_people(args.out))
        print(ladder_table(read_metrics(args.out / "ladder" / "rung0.jsonl")))
        curves = args.out / "ladder" / "gap_curves.jsonl"
        if curves.is_file():
            print(gap_curve_table(read_metrics(curves)))
        return
    from pv_jax.toy.photoverse import CONFIGS, RELEASE

    runs = {v: args.work / f"pv_{v}" for v in CONFIGS if (args.work / f"pv_{v}").is_dir()}
    print(plot_losses(args.out, runs))
    path = args.out / "eval" / "toy_eval.json"
    if path.is_file():
        report = json.loads(path.read_text())
        print(plot_ablation(args.out, report))
        text = tables(report) + "\nConditioning gain on the held-out people:\n\n"
        text += gain_table(report)
        tunes = {
            n: json.loads((w / "tuning.json").read_text())
            for n, w in runs.items()
            if (w / "tuning.json").is_file()
        }
        if tunes:
            released = json.loads((args.out / RELEASE / "tuning.json").read_text())
            release = next((n for n, t in tunes.items() if t == released), None)
            text += "\nEach run's sampling, chosen on the validation people:\n\n"
            text += tuning_table(tunes, release)
        (args.out / "eval" / "toy_eval.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
