"""Turning the measurements into the outputs: the targets and whether they are
met, the markdown tables (Avalon.jl's shape: rows are frameworks, columns the
figures), the JSON file and the chart.
"""
from __future__ import annotations

import json
import math
import re
import statistics

from .machine import AVALON_BLAS_KEY
from .measure import LATENCY_BLOCK, LATENCY_WARMUP

FRAMEWORK_ORDER = ("avalon", "torch_eager", "torch_tuned_malloc", "torch_compile")
LABELS = {"avalon": "Avalon", "torch_eager": "PyTorch eager", "torch_tuned_malloc": "PyTorch eager, tuned malloc",
          "torch_compile": "torch.compile"}
LOSS_TOLERANCE = 0.05          # "within noise": relative difference of mean losses
CURVE_WINDOW = 50              # steps per window when comparing the first-epoch curves


def schedule_timings_text(timings: dict) -> str:
    """'batch split across threads 8.41 ms, one thread 11.02 ms, ...', fastest first."""
    return ", ".join(f"{label} {seconds * 1e3:.2f} ms" for label, seconds in sorted(timings.items(),
                                                                                   key=lambda kv: kv[1]))


def fmt_seconds(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_number(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def fmt_mib(x) -> str:
    return "—" if x is None else f"{x:.0f} MiB"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def figures(metric: str):
    """(key, column title, formatter) of the table's columns."""
    return [("compile_s", "compile", fmt_seconds), ("time_per_epoch_s", "time/epoch", fmt_seconds),
            ("total_s", "total time", fmt_seconds), ("predict_batch_s", "prediction (batch)", fmt_seconds),
            ("predict_sample_s", "prediction (sample)", fmt_seconds), ("final_loss", "final loss", fmt_number),
            ("test_metric", metric, fmt_number), ("peak_memory_mib", "peak memory", fmt_mib)]


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(frameworks: dict, metric: str) -> dict:
    a, t = frameworks.get("avalon", {}), frameworks.get("torch_eager", {})
    return {key: _ratio(a.get(key), t.get(key)) for key, _, _ in figures(metric)}


def _rel(a, b):
    return abs(a - b) / abs(b) if b else float("inf")


def _windows(losses, width):
    return [statistics.fmean(losses[i:i + width]) for i in range(0, len(losses) - width + 1, width)] \
        or [statistics.fmean(losses)]


def loss_agreement(avalon: dict, torch_eager: dict) -> dict:
    """How close Avalon's losses are to PyTorch eager's, trained from the same
    weights on the same batches."""
    ea, et = avalon["epoch_mean_losses"], torch_eager["epoch_mean_losses"]
    first_a, first_t = avalon["losses"][:avalon["steps_per_epoch"][0]], \
        torch_eager["losses"][:torch_eager["steps_per_epoch"][0]]
    width = min(CURVE_WINDOW, max(1, len(first_a) // 10))
    wa, wt = _windows(first_a, width), _windows(first_t, width)
    return {
        "first_step_rel_diff": _rel(avalon["losses"][0], torch_eager["losses"][0]),
        "final_loss_rel_diff": _rel(avalon["final_loss"], torch_eager["final_loss"]),
        "epoch_mean_max_rel_diff": max(_rel(a, t) for a, t in zip(ea, et)),
        "first_epoch_window_steps": width,
        "first_epoch_window_max_rel_diff": max(_rel(a, t) for a, t in zip(wa, wt)),
        "tolerance": LOSS_TOLERANCE,
    }


def _target(name, goal, value_text, met):
    return {"target": name, "goal": goal, "value": value_text, "met": met}


#: the first step's compilation: cold (C compiler runs) and warm (every kernel from the disk cache)
COLD_COMPILE_GOAL_S, WARM_COMPILE_GOAL_S = 1.0, 0.050


def compile_target(avalon: dict) -> dict:
    """The compile target of the first step: warm when it ran no C compiler (its
    kernels all came from the disk cache), cold otherwise; unknown: the cold goal."""
    builds = avalon.get("compile_builds")
    if builds == 0:
        what, goal = "warm: every kernel from the disk cache", WARM_COMPILE_GOAL_S
        if avalon.get("compile_remembered"):
            what += ", and the schedule an earlier run chose, compiled alone"
    else:
        what = f"cold: {builds} C compiler run{'s' if builds != 1 else ''}" if builds else "cold"
        goal = COLD_COMPILE_GOAL_S
    goal_text = f"< {goal * 1e3:.0f} ms" if goal < 1 else f"< {goal:.0f} s"
    return _target(f"compile (trace + codegen of the training step; {what})", goal_text,
                   fmt_seconds(avalon["compile_s"]), avalon["compile_s"] < goal)


def targets(result: dict, device: str, epoch_goal: float) -> list:
    fw, r = result["frameworks"], result["ratios"]
    avalon = fw["avalon"]
    out = [_target("time per epoch vs PyTorch eager", f"<= {epoch_goal:.2f}x", fmt_ratio(r["time_per_epoch_s"]),
                   r["time_per_epoch_s"] is not None and r["time_per_epoch_s"] <= epoch_goal)]
    for key in ("torch_tuned_malloc", "torch_compile"):
        other = fw.get(key, {})
        ratio = _ratio(avalon.get("time_per_epoch_s"), other.get("time_per_epoch_s"))
        if ratio is None:
            why = result["skipped"].get(key) or other.get("failed") or "not measured"
            out.append(_target(f"time per epoch vs {LABELS[key]}", "< 1.00x", f"not measured ({why})", None))
        else:
            out.append(_target(f"time per epoch vs {LABELS[key]}", "< 1.00x", fmt_ratio(ratio), ratio < 1.0))
    out.append(compile_target(avalon))
    for key, what in (("predict_batch_s", "batch"), ("predict_sample_s", "one sample")):
        ratio = r[key]
        out.append(_target(f"prediction latency, {what}, vs PyTorch eager", "<= 1.00x", fmt_ratio(ratio),
                           ratio is not None and ratio <= 1.0))
    agree = result["loss_agreement"]
    tol = f"{LOSS_TOLERANCE:.0%}"
    out.append(_target("final training loss vs PyTorch eager", f"within {tol}",
                       f"{agree['final_loss_rel_diff']:.2%} apart", agree["final_loss_rel_diff"] <= LOSS_TOLERANCE))
    out.append(_target("per-epoch mean losses vs PyTorch eager (loss curves agree)", f"max within {tol}",
                       f"max {agree['epoch_mean_max_rel_diff']:.2%} apart (first epoch, "
                       f"{agree['first_epoch_window_steps']}-step windows: max "
                       f"{agree['first_epoch_window_max_rel_diff']:.2%})",
                       agree["epoch_mean_max_rel_diff"] <= LOSS_TOLERANCE))
    if device != "cpu":
        out[0]["target"] += f" (GPU: {device})"
    return out


def training_missed(target_list) -> bool:
    """Whether Avalon misses a training-speed target (explained by a profile of its step)."""
    return any(t["met"] is False for t in target_list
               if "time per epoch" in t["target"] or t["target"].startswith("compile"))


def prediction_missed(target_list) -> bool:
    """Whether Avalon misses a prediction-latency target (explained by a profile of its forward)."""
    return any(t["met"] is False for t in target_list if t["target"].startswith("prediction"))


# -- markdown --------------------------------------------------------------------------

def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def workload_markdown(result: dict, device: str) -> str:
    wl = result["workload"]
    metric = wl["metric"]
    cols = figures(metric)
    fw = result["frameworks"]
    where = "CPU" if device == "cpu" else "GPU"
    lines = [f"## {wl['title']}", "",
             f"Batch {wl['batch_size']}, {wl['optimizer']} lr {wl['lr']}, {wl['loss']}; "
             f"{result['epochs']} epochs of {result['steps_per_epoch']} steps "
             f"({'all' if not result['max_batches'] else 'the first'} batches of each epoch"
             f"{'' if not result['max_batches'] else ', quick mode'}).", "",
             _row([""] + [title for _, title, _ in cols] + []),
             _row(["---"] * (len(cols) + 1))]
    for key in FRAMEWORK_ORDER:
        label = f"{LABELS[key]} ({where})"
        if key in fw and not fw[key].get("failed"):
            lines.append(_row([label] + [fmt(fw[key].get(k)) for k, _, fmt in cols]))
        else:
            why = result["skipped"].get(key) or fw.get(key, {}).get("failed") or "not run"
            lines.append(_row([label] + [f"skipped: {why}"] + ["—"] * (len(cols) - 1)))
    lines.append(_row(["**Avalon / PyTorch eager**"] + [fmt_ratio(result["ratios"][k]) for k, _, _ in cols]))
    lines += ["", "Ratios, figure by figure:", "", _row(["figure", "Avalon", "PyTorch eager", "Avalon / PyTorch eager"]),
              _row(["---"] * 4)]
    for key, title, fmt in cols:
        lines.append(_row([title, fmt(fw["avalon"].get(key)), fmt(fw["torch_eager"].get(key)),
                           fmt_ratio(result["ratios"][key])]))
    # Less sensitive to a burst of load than the epoch median, with few epochs.
    a_step, t_step = fw["avalon"].get("median_step_s"), fw["torch_eager"].get("median_step_s")
    lines.append(_row(["training step (median of all steps)", fmt_seconds(a_step), fmt_seconds(t_step),
                       fmt_ratio(_ratio(a_step, t_step))]))
    lines += ["", "Targets:", "", _row(["target", "goal", "measured", "met?"]), _row(["---"] * 4)]
    for t in result["targets"]:
        met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(_row([t["target"], t["goal"], t["value"], met]))
    lines += ["", *_notes(result)]
    if result.get("profile"):
        lines += ["", "Where the Avalon training step's time goes (explaining the missed speed targets):", ""]
        b = result.get("step_breakdown")
        if b:
            # the schedule the first calls chose: the batch split, one thread, or BLAS's own threads
            timed = f": {schedule_timings_text(b['timings'])}" if b.get("timings") else ""
            chosen = ("the schedule an earlier run timed fastest, kept in the tuning cache" if b.get("remembered")
                      else "the schedule its calls timed fastest")
            split = (f"run as \"{b['schedule']}\" ({chosen}{timed})"
                     + ("; the kernels below are one thread's share" if "shards" in b["profiled"] else ""))
            how = ("the gradient and the optimizer update compiled as one call (avalon.optim.train_step)"
                   if b.get("fused") else "the compiled gradient call, then the optimizer update")
            lines += [f"- One step = {how}: {fmt_seconds(b['step_s'])}; the gradient call alone takes "
                      f"{fmt_seconds(b['gradient_s'])} (medians of {b['calls']} calls after training).",
                      f"- The step is {split}; the gradient call's kernels take {fmt_seconds(b['kernels_s'])} "
                      "(timed one by one, so slightly more than in the real step); the rest is the update's "
                      "passes over the parameters, dispatch, thread hand-offs and Python.", ""]
        lines += ["Top 10 kernels of `avalon.profile` of the gradient step:", "", "```", result["profile"], "```"]
    if result.get("profile_predict"):
        lines += ["", "Where the Avalon prediction's time goes (top 10 kernels of `avalon.profile` of the "
                  "compiled forward on one batch, explaining the missed latency targets):", "", "```",
                  result["profile_predict"], "```"]
        if result.get("predict_schedule"):
            lines += ["", f"The batch prediction ran as \"{result['predict_schedule']}\" (the schedule its "
                      "first calls timed fastest); the profile times its kernels one by one on one thread."]
    return "\n".join(lines)


def _notes(result) -> list:
    notes = []
    for key, why in result["skipped"].items():
        notes.append(f"- {LABELS[key]} skipped: {why}.")
    for key, f in result["frameworks"].items():
        if f.get("failed"):
            notes.append(f"- {LABELS[key]} failed: {f['failed']}.")
        for what, name in (("predict_batch", "batch"), ("predict_sample", "one-sample")):
            if f.get(what, {}).get("failed"):
                notes.append(f"- {LABELS[key]} {name} prediction failed: {f[what]['failed']}.")
        mem = f.get("memory", {})
        if mem.get("failed"):
            notes.append(f"- {LABELS[key]} peak memory not measured: {mem['failed']}.")
    tuned = result["frameworks"].get("torch_tuned_malloc")
    if tuned and not tuned.get("failed"):
        notes.append(f"- {LABELS['torch_tuned_malloc']}: a subprocess started with "
                     f"{', '.join(f'{k}={v}' for k, v in tuned['malloc'].items())}, trained on the same data, "
                     "weights and batch order, its epochs interleaved with the others; only its training "
                     "figures are measured.")
    return notes


def header_markdown(info: dict) -> str:
    m, v = info["machine"], info["versions"]
    cfg = info["config"]
    load = info["load"]
    lines = ["# Avalon vs PyTorch", "",
             f"- Run: {info['started']}, `{info['command']}`" + (" (quick mode: a smoke run, not a benchmark)"
                                                                  if cfg["quick"] else ""),
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}",
             f"- Load: `{load['uptime_before']}` before; `{load['uptime_after']}` after "
             "(the machine is shared: figures are medians of interleaved runs; compare ratios)",
             f"- Versions: python {v['python']}, numpy {v['numpy']} ({v['numpy BLAS']}), torch {v['torch']}, "
             f"avalon {v['avalon']}, avalon-layers {v['avalon-layers']}, avalon-zoo {v['avalon-zoo']}, "
             f"commit {v['git commit']}",
             f"- Avalon's compiled code multiplies matrices with "
             f"{v.get(AVALON_BLAS_KEY) or 'NumPy calls'} (AVALON_BLAS; PyTorch uses its own MKL)",
             f"- Data: {info['data']['description']}",
             f"- Threads: PyTorch {info['threads']['torch']} (torch.set_num_threads; = cores); Avalon up to "
             f"{info['threads']['avalon']} (its own threads, each on a share of the batch with a "
             "single-threaded BLAS, where it can split the step's graph)",
             f"- Device: {cfg['device']}",
             "",
             "How each figure is measured (all frameworks in one process unless said otherwise):",
             "",
             "- compile: first training step minus the median step (Avalon: trace + differentiation + "
             "code generation of the step, warm when the C compiler did not run (every kernel from the "
             "disk cache), goal 50 ms, else cold, goal 1 s; a step with several schedules compiles one in its "
             "first call: the one an earlier run chose when the tuning cache holds it, else the first, and the "
             "others when its autotuner first tries them; torch.compile: Dynamo/Inductor compilation; "
             "PyTorch eager: first-call warm-up).",
             "- time/epoch: median over epochs of the epoch's wall time (batch slicing included), the "
             "first epoch without the compile overhead; epochs interleaved (Avalon epoch 1, PyTorch "
             "epoch 1, ..., Avalon epoch 2, ...).",
             "- total time: all epochs, compilation included.",
             f"- prediction: median of {cfg['latency_repeats'][0]} (batch) and {cfg['latency_repeats'][1]} "
             "(one sample) calls of the forward pass in eval mode (Avalon: avalon.jit; "
             f"PyTorch: torch.no_grad), the frameworks taking turns in blocks of {LATENCY_BLOCK} calls, "
             f"after {LATENCY_WARMUP} warm-up calls each.",
             "- final loss: mean training loss over the last epoch; test metric on "
             f"{cfg['test_examples']} test examples.",
             f"- peak memory: in a fresh subprocess per framework, the growth of the peak RSS "
             "(getrusage ru_maxrss) from after the imports to after building the model, "
             f"{cfg['memory_steps']} training steps and a few predictions (host memory only).",
             ""]
    return "\n".join(lines)


def markdown(info: dict) -> str:
    parts = [header_markdown(info)]
    for name, result in info["benchmarks"].items():
        parts.append(workload_markdown(result, info["config"]["device"]))
    if info.get("steps"):
        from .steps import markdown as steps_markdown
        parts.append(steps_markdown(info["steps"]))
    return "\n\n".join(parts) + "\n"


# -- JSON ------------------------------------------------------------------------------

def _clean(obj):
    """JSON-safe: NaN and infinity become null (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _is_number_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in x)


def write_json(info: dict, path) -> None:
    """Indented, except lists of numbers (the per-step losses and times), each on one line."""
    inline: list = []

    def mark(obj):
        if _is_number_list(obj):
            inline.append(json.dumps(obj))
            return f"\x00{len(inline) - 1}\x00"
        if isinstance(obj, dict):
            return {k: mark(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [mark(v) for v in obj]
        return obj

    text = json.dumps(mark(_clean(info)), indent=1)
    # The markers hold characters no real string here has (json writes them as \u0000).
    text = re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: inline[int(m.group(1))], text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# -- chart -----------------------------------------------------------------------------

COLORS = {"avalon": "#c0392b", "torch_eager": "#2c3e50", "torch_tuned_malloc": "#7f8c8d",
          "torch_compile": "#2980b9"}


def _smooth(values, width):
    if len(values) <= width:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_chart(info: dict, path) -> bool:
    """The epoch-time and loss-curve chart of the epoch benchmarks; False when
    there are none (the step rows have their table only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(info["benchmarks"])
    if not names:
        return False
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        result = info["benchmarks"][name]
        fw = result["frameworks"]
        keys = [k for k in FRAMEWORK_ORDER if k in fw and not fw[k].get("failed")]
        bars, times = row[0], [fw[k]["time_per_epoch_s"] for k in keys]
        spread = [[t - min(fw[k]["steady_epoch_s"]) for k, t in zip(keys, times)],
                  [max(fw[k]["steady_epoch_s"]) - t for k, t in zip(keys, times)]]
        bars.bar([LABELS[k].replace(", ", ",\n") for k in keys], times, yerr=spread, capsize=4,
                 color=[COLORS[k] for k in keys])
        goal = result["epoch_goal"] * fw["torch_eager"]["time_per_epoch_s"]
        bars.axhline(goal, color=COLORS["avalon"], linestyle="--", linewidth=1,
                     label=f"target: {result['epoch_goal']:.2f}x PyTorch eager")
        bars.set_ylabel("seconds per epoch (median; bars: min-max)")
        bars.set_title(f"{name.upper()}: time per epoch")
        bars.legend(loc="upper right", fontsize=8)
        curves = row[1]
        for k in keys:
            if "curve_s" not in fw[k]:
                continue
            width = max(1, min(50, len(fw[k]["losses"]) // 20))
            curves.plot(fw[k]["curve_s"], _smooth(fw[k]["losses"], width), color=COLORS[k],
                        label=LABELS[k], linewidth=1.2)
        curves.set_xlabel("training wall time, s (compilation included)")
        curves.set_ylabel("training loss (running mean)")
        curves.set_title(f"{name.upper()}: loss against wall time")
        curves.legend(fontsize=8)
    fig.suptitle(f"Avalon vs PyTorch ({info['data']['kind']} data, {info['machine']['cpu']}, "
                 f"{info['machine']['cores']} cores)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
