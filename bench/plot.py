"""The benchmark picture: latency and speed-up against budget, pruned against ideal."""

from __future__ import annotations

from pathlib import Path


def plot_bench(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    budgets = [b for b in dict.fromkeys(r["budget"] for r in rows) if b != "full"]
    batches = sorted({r["batch"] for r in rows})
    x = [float(b) for b in budgets]
    figure, (latency, speedup) = plt.subplots(1, 2, figsize=(11, 4.2))
    for batch in batches:
        get = {(r["budget"], r["variant"]): r["prefill_ms"]["median"] for r in rows if r["batch"] == batch}
        full = [get[(b, "full")] for b in budgets]  # measured beside each budget
        pruned = [get[(b, "pruned")] for b in budgets]
        ideal = [get[(b, "ideal")] for b in budgets]
        line = latency.plot(x, pruned, "o-", label=f"pruned, batch {batch}")[0]
        latency.plot(x, ideal, "s--", color=line.get_color(), alpha=0.6, label=f"ideal, batch {batch}")
        latency.plot(x, full, ":", color=line.get_color(), label=f"full (unpruned), batch {batch}")
        speedup.plot(x, [f / p for f, p in zip(full, pruned)], "o-", color=line.get_color(), label=f"pruned, batch {batch}")
        speedup.plot(x, [f / i for f, i in zip(full, ideal)], "s--", color=line.get_color(), alpha=0.6, label=f"ideal, batch {batch}")
    machine = report["machine"]
    where = machine.get("gpu", f"{machine['cpu_count']}-core CPU")
    latency.set(xlabel="budget (average visual tokens per LLM layer)", ylabel="prefill (ms, median)",
                title=f"Prefill latency ({report['config']['backend']}, {where})")
    speedup.set(xlabel="budget (average visual tokens per LLM layer)", ylabel="speed-up vs full",
                title="Prefill speed-up: pruned vs ideal")
    for axis in (latency, speedup):
        axis.set_xticks(x)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
