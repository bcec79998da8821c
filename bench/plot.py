"""Plots rows saved by `bench/compare.py --save` as an SVG: tokens/s and
peak RSS (two panels) against sequence length or model size, one line per
side and workload (medians over the runs at each point). Standard library
only.

    python3 bench/plot.py --x seq --out bench/plots/context.svg long.json
    python3 bench/plot.py --x params --out bench/plots/size.svg smollm2.json 1b.json 3b.json

With --x params the model's parameter count comes from --params
NAME=COUNT (file name of the model as saved, count in millions).
"""

import argparse
import json
import statistics

W, H, PAD = 370, 260, 62
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def panel(series, x_label, y_label, ox):
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y1 = max(ys) * 1.1
    sx = lambda x: ox + PAD + (x - x0) / ((x1 - x0) or 1) * (W - 1.5 * PAD)
    sy = lambda y: H - PAD + 10 - y / y1 * (H - 1.5 * PAD)
    out = [f'<rect x="{ox + PAD}" y="{PAD / 2}" width="{W - 1.5 * PAD}" height="{H - 1.5 * PAD}" fill="none" stroke="#999"/>']
    for i in range(5):
        y = y1 * i / 4
        out.append(f'<text x="{ox + PAD - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
    for x in sorted(set(xs)):
        out.append(f'<text x="{sx(x):.1f}" y="{H - PAD + 26}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{ox + PAD + (W - 1.5 * PAD) / 2}" y="{H - 8}" text-anchor="middle">{x_label}</text>')
    out.append(f'<text x="{ox + 12}" y="{H / 2}" text-anchor="middle" transform="rotate(-90 {ox + 12} {H / 2})">{y_label}</text>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts = sorted(pts)
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in pts]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--x", choices=["seq", "params"], required=True)
    ap.add_argument("--params", action="append", default=[], help="MODEL_FILE=MILLIONS")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    params = dict(p.split("=") for p in args.params)
    points = {}
    for f in args.files:
        for r in json.load(open(f)):
            x = r["seq"] if args.x == "seq" else float(params[r["model"]])
            key = f'{r["side"]} {r["workload"]} ({r.get("precision", "f32")})'
            points.setdefault(key, {}).setdefault(x, []).append(r)
    med = lambda metric: {k: [(x, statistics.median(r[metric] for r in rs)) for x, rs in v.items()] for k, v in points.items()}
    x_label = "tokens per sequence" if args.x == "seq" else "parameters (millions)"
    body = panel(med("tokens_per_s"), x_label, "tokens/s", 0) + panel(med("peak_rss_mib"), x_label, "peak RSS (MiB)", W + 20)
    legend = [f'<text x="{PAD + 4}" y="{H + 18 + 16 * i}" fill="{COLORS[i % len(COLORS)]}">{name}</text>'
              for i, name in enumerate(sorted(points))]
    height = H + 24 + 16 * len(points)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + 40}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect width="100%" height="100%" fill="white"/>', f'<text x="{PAD}" y="16" font-size="13">{args.title}</text>'] + body + legend + ["</svg>"]
    with open(args.out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
