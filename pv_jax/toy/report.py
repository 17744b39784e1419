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
# The people ladder (fifth session): the identity recipe on sd_v2 trained on the first N
# training people (data.split="train[:N]"); the 709-people run is ladder_identity_v2.
PEOPLE_RUNS = {"people_177": 177, "people_354": 354, "ladder_identity_v2": 709}


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    cells = ["| " + " | ".join(map(str, r)) + " |" for r in (header, *rows)]
    return "\n".join([cells[0], "|" + "---|" * len(header), *cells[1:]]) + "\n"


def _pct(x: float, digits: int = 1) -> str:
    return f"{x * 100:+.{digits}f}%"


def _ci(gap: dict, digits: int = 1) -> str:
    lo, hi = gap["ci95"]
    return f"[{lo * 100:+.{digits}f}, {hi * 100:+.{digits}f}]"


def _yerr(gaps: list[dict]) -> np.ndarray:
    """(2, N) error bars in percent from gap rows' 95% intervals."""
    return np.array([[g["gap"] - g["ci95"][0], g["ci95"][1] - g["gap"]] for g in gaps]).T * 100


def _figure(cols: int, size: tuple[float, float], rows: int = 1):
    """A matplotlib figure without a display: (pyplot, figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(rows, cols, figsize=size)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _panel(ax, title: str, xlabel: str, ylabel: str, *, ref: float | None = None, **kw) -> None:
    """Title, axis labels, a dotted reference line at ``ref`` and a small legend."""
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls=":")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **kw)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_losses(out: Path, runs: dict[str, Path]) -> Path:
    """Loss curves: the three toy base stages, then every PhotoVerse loss term per run."""
    plt, fig, axes = _figure(4, (16, 7), rows=2)
    stages = [("vae", "l1"), ("unet", "loss"), ("vision", "loss"), ("vision", "top1")]
    for ax, (stage, key) in zip(axes[0], stages, strict=True):
        path = out / f"{stage}_metrics.jsonl"  # the stage's copy, beside its model
        rows = read_metrics(path) if path.is_file() else []
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        _panel(ax, f"stage {stage}: {key}", "step", key)
    for ax, term in zip(axes[1], ("diffusion", "face", "text_reg", "image_reg"), strict=True):
        for name, workdir in runs.items():
            rows = [r for r in read_metrics(workdir, by_step=True) if term in r]
            y = np.array([r[term] for r in rows])
            if len(y) >= 5:  # a 5-point running mean
                y = np.convolve(y, np.ones(5) / 5, mode="valid")
            if len(y):
                ax.plot([r["step"] for r in rows][len(rows) - len(y) :], y, label=name)
        _panel(ax, f"PhotoVerse: {term}", "step", term)
    return _save(plt, fig, out / "losses.png")


def plot_ablation(out: Path, report: dict) -> Path:
    """Bars per run: own-reference, other-photo, other-people similarity and identification."""
    plt, fig, (a1, a2, a3) = _figure(3, (20, 4.5))
    runs = report["runs"]
    names, x = list(runs), np.arange(len(runs))
    keys = {
        "own_mean": "own reference",
        "other_photo_mean": "other photo, same person",
        "other_people_mean": "other people (mean)",
        "other_people_max": "other people (max)",
    }
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys.items()):
        vals = [runs[n]["identity"]["all"].get(key, np.nan) for n in names]
        a1.bar(x + k * width, vals, width, label=label)
    a1.set_xticks(x + 0.4 - width / 2, names, rotation=15, fontsize=8)
    # dlib cosines of faces: different people ~0.83, same person ~0.96
    _panel(a1, "identity", "", "dlib cosine (held-out people)", ylim=(0.7, 1.0))
    a2.bar(names, [runs[n]["identity"]["all"].get("identification", np.nan) for n in names])
    chance = runs[names[0]]["identity"]["all"]["chance"]
    a2.axhline(chance, color="k", ls="--", label=f"chance {chance:.3f}")
    a2.axhline(10 * chance, color="r", ls=":", label="10x chance (target)")
    a2.tick_params(axis="x", rotation=15, labelsize=8)
    _panel(a2, "identification", "", "identification (top-1 own reference)")
    gapped = [n for n in names if "x0_gap" in runs[n]]
    if gapped:
        bands = list(runs[gapped[0]]["x0_gap"])
        w = 0.8 / len(bands)
        for k, band in enumerate(bands):
            gaps = [runs[n]["x0_gap"][band] for n in gapped]
            y = [g["gap"] * 100 for g in gaps]
            a3.bar(
                np.arange(len(gapped)) + k * w, y, w, yerr=_yerr(gaps), capsize=3, label=f"t {band}"
            )
        a3.set_xticks(np.arange(len(gapped)) + 0.4 - w / 2, gapped, fontsize=8)
        _panel(
            a3,
            "conditioning gain on the held-out people (95% CI)",
            "",
            "x0 error: shuffled / own reference - 1 (%)",
            ref=0,
        )
    return _save(plt, fig, out / "ablation.png")


def tables(report: dict) -> str:
    """Markdown: identity per run (all prompts), then prompt following per run."""
    rows = []
    for name, r in report["runs"].items():
        m, s = r["identity"]["all"], r.get("sampling")
        rows.append(
            [
                name,
                f"{s['guidance']:g} / {s['eta']:g}" if s else "",
                m["images"],
                f"{m['face_rate']:.2f}",
                f"{fmt(m.get('own_mean'))} ± {fmt(m.get('own_std'))}",
                fmt(m.get("other_photo_mean")),
                f"{fmt(m.get('other_people_mean'))} / {fmt(m.get('other_people_max'))}",
                f"{fmt(m.get('identification'))} ({m['chance']:.3f})",
                PAPER.get(name, ""),
            ]
        )
    head = "run|CFG / eta|images|face rate|own ref (± std)|other photo|other people mean / max"
    text = _table([*head.split("|"), "identification (chance)", "paper ArcFace ID"], rows)
    followed = {
        n: r["prompt_following"] for n, r in report["runs"].items() if r.get("prompt_following")
    }
    if followed:
        attrs = list(next(iter(followed.values())))
        rows = [
            [n, *(f"{pf[a]['with_word']:.2f} vs {pf[a]['without_word']:.2f}" for a in attrs)]
            for n, pf in followed.items()
        ]
        text += (
            "\nPrompt following: fraction of images showing the attribute, with the word "
            'vs without it ("a photo of S*").\n\n' + _table(["run", *attrs], rows)
        )
    return text


def gain_table(report: dict) -> str:
    """Markdown: each run's conditioning gain on the held-out people per band of t: the x0 gap
    (shuffled vs own reference) with its 95% interval, and the own reference against the frozen
    base (``pv_jax.toy.diagnose.x0_gap``)."""
    gaps = {n: r["x0_gap"] for n, r in report["runs"].items() if r.get("x0_gap")}
    if not gaps:
        return ""
    bands = list(next(iter(gaps.values())))
    header = ["run", *(f"x0 gap t {b} [95% CI]" for b in bands)]
    header.append(f"own reference vs frozen base, t {' / '.join(bands)}")
    rows = [
        [
            name,
            *(f"{_pct(g['gap'], 2)} {_ci(g, 2)}" for g in gap.values()),
            " / ".join(_pct(g["gain_over_base"]) for g in gap.values()),
        ]
        for name, gap in gaps.items()
    ]
    return _table(header, rows)


def tuning_table(tunes: dict[str, dict], release: str | None = None) -> str:
    """Markdown: each run's guidance sweep on the validation people (its choice in bold) and
    its validation x0 gap at t >= 600 (the release's rule)."""
    rows = []
    for name, tune in tunes.items():
        gap = tune.get("val_x0_gap", {}).get("600-1000")
        for g, m in tune["sweep"].items():
            chosen = float(g) == tune["guidance"]
            pf = m.get("prompt_following", {})
            rows.append(
                [
                    f"{name} (released)" if name == release else name,
                    f"**{g}**" if chosen else g,
                    f"{m['face_rate']:.2f}",
                    fmt(m.get("own_mean")),
                    fmt(m.get("other_people_mean")),
                    f"{fmt(m.get('identification'))} ({m['chance']:.3f})",
                    " / ".join(f"{v['with_word']:.2f}" for v in pf.values()),
                    _pct(gap["gap"], 2) if gap and chosen else "",
                ]
            )
    header = "run|guidance|face rate|own ref|other people mean|identification (chance)"
    header += "|grayscale / red / blue with the word|val x0 gap t >= 600"
    return _table(header.split("|"), rows)


def ladder_table(rows: list[dict]) -> str:
    """Rung 0 (``ladder/rung0.jsonl``): each run's x0 gap per band at its last step, with the
    95% interval of the middle band and the own reference's gain over the frozen base."""
    out = []
    for r in rows:
        last = r["history"][-1]
        gap = last["x0_gap"]
        setting = [f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()]
        setting += ["fusion"] * bool(r.get("fusion"))
        setting += [f"batch x{r['repeat']}"] * (r.get("repeat", 1) > 1)
        setting += ["oracle tokens"] * bool(r.get("oracle"))
        out.append(
            [
                r["name"],
                ", ".join(setting) or "the paper's (copy init)",
                last["step"],
                " / ".join(_pct(gap[b]["gap"]) for b in BANDS),
                _ci(gap["300-600"]),
                " / ".join(
                    _pct(gap[b]["gain_over_base"]) if "gain_over_base" in gap[b] else "-"
                    for b in BANDS
                ),
                f"{r['seconds']:.0f}",
            ]
        )
    bands = " / ".join(BANDS)
    header = ["run", "setting", "steps", f"x0 gap {bands}", "95% CI (300-600)"]
    return _table([*header, f"gain over base {bands}", "s"], out)


def gap_curve_table(rows: list[dict]) -> str:
    """Rung 2 (``ladder/gap_curves.jsonl``): per run, split and checkpoint, the x0 gap per band
    with the 95% interval at t >= 600, and the own reference's gain over the frozen base."""
    out = [
        [
            Path(r["run"]).name,
            f"{r['split']} ({r['photos']})",
            r["step"],
            " / ".join(_pct(r["x0_gap"][b]["gap"], 2) for b in BANDS),
            _ci(r["x0_gap"]["600-1000"], 2),
            " / ".join(_pct(r["x0_gap"][b]["gain_over_base"]) for b in BANDS),
        ]
        for r in sorted(rows, key=lambda r: (r["run"], r["split"] != "val", r["step"]))
    ]
    bands = " / ".join(BANDS)
    header = ["run", "people", "step", f"x0 gap {bands}", "95% CI (600-1000)"]
    return _table([*header, f"gain over base {bands}"], out)


def _curve(rows: list[dict], run: str, split: str) -> list[dict]:
    """The gap-curve rows of the run whose name ends with ``run`` on ``split``, by step."""
    part = (r for r in rows if r["run"].endswith(run) and r["split"] == split)
    return sorted(part, key=lambda r: r["step"])


def plot_ladder(out: Path) -> Path:
    """ladder.png: rung 0's middle-band gap against steps per run; rung 2's gap on the
    validation and training people against steps per band (and with identity tokens); the
    base's face rate against continued-training steps; rung 2's gain over the frozen base."""
    d = out / "ladder"
    plt, fig, axes = _figure(4, (22, 4.6))
    for r in read_metrics(d / "rung0.jsonl"):
        named = r["name"] in RUNG0_NAMED
        axes[0].plot(
            [x["step"] for x in r["history"]],
            [x["x0_gap"]["300-600"]["gap"] * 100 for x in r["history"]],
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
    curves = read_metrics(d / "gap_curves.jsonl") if (d / "gap_curves.jsonl").is_file() else []
    if curves:
        for split, style in (("val", "-"), ("train", "--")):
            part = _curve(curves, "ladder", split)
            for b in BANDS:
                gaps = [r["x0_gap"][b] for r in part]
                axes[1].errorbar(
                    [r["step"] for r in part],
                    [g["gap"] * 100 for g in gaps],
                    yerr=_yerr(gaps),
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
            part = _curve(curves, run, split)
            if part:
                x = [r["step"] for r in part]
                axes[1].plot(
                    x, [r["x0_gap"]["600-1000"]["gap"] * 100 for r in part], style, label=label
                )
        val = _curve(curves, "ladder", "val")
        for b in BANDS:
            gains = [r["x0_gap"][b]["gain_over_base"] * 100 for r in val]
            axes[3].plot([r["step"] for r in val], gains, marker="o", label=f"val t {b}")
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
            eta = rows[0].get("eta", 0.0)
            axes[2].plot(
                [r["step"] for r in rows],
                [r["val_face_rate"] for r in rows],
                "o-",
                label=f"DDIM eta {eta:g}",
            )
    _panel(
        axes[2],
        "base: face rate (64 validation seeds, CFG 3)",
        "continued-training steps (EMA)",
        "dlib face rate",
        ref=0.8,
        ylim=(0, 1),
    )
    return _save(plt, fig, d / "ladder.png")


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
    rows = people_rows(read_metrics(out / "ladder" / "gap_curves.jsonl"), step)
    plt, fig, axes = _figure(4, (20, 4.2))
    for ax, band in zip(axes[:3], BANDS, strict=True):
        for split, style, what in (
            ("val", "o-", "37 validation people"),
            ("train", "s--", "its own photos"),
        ):
            people = sorted(n for (sp, n) in rows if sp == split)
            gaps = [rows[(split, n)]["x0_gap"][band] for n in people]
            if people:
                y = [g["gap"] * 100 for g in gaps]
                ax.errorbar(
                    people, y, yerr=_yerr(gaps), fmt=style, capsize=3, label=f"{split} ({what})"
                )
        _panel(
            ax, f"t in [{band.replace('-', ', ')})", "training people", "x0 gap (%), 95% CI", ref=0
        )
    val = sorted(n for (sp, n) in rows if sp == "val")
    for band in BANDS:
        gains = [rows[("val", n)]["x0_gap"][band]["gain_over_base"] * 100 for n in val]
        axes[3].plot(val, gains, "o-", label=f"t {band}")
    _panel(
        axes[3],
        "validation: own reference vs the frozen base",
        "training people",
        "x0 error gain over the base (%)",
        ref=0,
    )
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([177, 354, 709], ["177", "354", "709"])
    fig.suptitle(f"identity recipe on sd_v2, step {step}: the gap against the number of people")
    return _save(plt, fig, out / "ladder" / "people.png")


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
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    print(plot_ablation(args.out, report))
    text = tables(report) + "\nConditioning gain on the held-out people:\n\n" + gain_table(report)
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
