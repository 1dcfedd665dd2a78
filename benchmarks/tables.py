"""The benchmarks' reports as text: what throughput.py prints and keeps in its result files."""


def throughput(rep):
    """throughput.py's report: the configuration, the machine, the ceiling, a row per implementation."""
    c, env, g, fpt, ctp = rep["config"], rep["environment"], rep["gemm"], rep["flops_per_token"], \
        rep["ceiling_tokens_per_s"]
    softmax = "full softmax" if c["softmax"] == "full" else f"class softmax, C={c['classes']}"
    wpb = c["windows_per_block"]
    lines = [
        f"config: m={c['hidden']} V={c['vocab']} T={c['bptt']} B={c['batch']}, {softmax}, float32, "
        f"{c['threads']} threads each, {c['repeats']} rounds of train {wpb['train']} / eval {wpb['eval']} windows",
        f"machine: {env['processor']}, {env['cpu_count']} CPUs; rnnlm {env['rnnlm']}, numba {env['numba']}, numpy "
        f"{env['numpy']}" + (f", torch {env['torch']}" if env["torch"] else "")
        + f"; load average {env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end",
    ]
    libraries = sorted({lib for sample in g["samples_gflops"] for lib in sample})
    per_lib = ", ".join(f"{lib} {sorted(s[lib] for s in g['samples_gflops'])[len(g['samples_gflops']) // 2]:.1f}"
                        for lib in libraries)
    cls = f" (|c| = {fpt['mean_target_class_size']:.1f})" if fpt["mean_target_class_size"] is not None else ""
    lines += [
        f"GEMM ceiling {g['shape']}: {g['ceiling_gflops']:.1f} GFLOP/s, the fastest library each round ({per_lib})",
        f"FLOPs/token{cls}: train {fpt['train'] / 1e6:.3f} M, eval {fpt['eval'] / 1e6:.3f} M; ceiling: train "
        f"{ctp['train']:,.0f} tok/s, eval {ctp['eval']:,.0f} tok/s",
        "",
        f"{'':8s} | {'train':^39s} | {'eval':^39s}",
    ]
    head = f"{'tok/s':>9s} {'min-max':>15s} {'xnumpy':>6s} {'%ceil':>6s}"
    lines.append(f"{'impl':8s} | {head} | {head}")
    for name, res in rep["results"].items():
        cells = [f"{e['median']:9,.0f} {e['min']:7,.0f}-{e['max']:<7,.0f} {e['ratio_vs_numpy_per_round_median']:6.2f} "
                 f"{100 * e['fraction_of_ceiling']:5.1f}%" for e in (res["train"], res["eval"])]
        lines.append(f"{name:8s} | {cells[0]} | {cells[1]}")
    lines.append("(tok/s: median over rounds; xnumpy: median of the per-round ratios; %ceil: FLOPs/token x tok/s / "
                 "ceiling)")
    if "torch" in rep["results"]:
        ours, theirs = rep["results"]["rnnlm"], rep["results"]["torch"]
        lines.append("rnnlm / torch: " + ", ".join(
            f"{kind} {ours[kind]['median'] / theirs[kind]['median']:.2f}" for kind in ("train", "eval")))
    memory = {name: res["memory_mb"] for name, res in rep["results"].items() if "memory_mb" in res}
    if memory:
        lines.append("peak memory: " + ", ".join(f"{name} {mb['peak']:.0f} MB ({mb['working']:.0f} MB working set)"
                                                 for name, mb in memory.items()))
    if rep["breakdown"]:
        lines.append("rnnlm's training step, kernel by kernel (synchronized after each; ms per window):")
        for op, r in rep["breakdown"]["ops"].items():
            rate = f" {r['gflops']:8.1f} GFLOP/s" if "gflops" in r else ""
            lines.append(f"  {op:20s} {r['ms']:8.2f} ms x{r['calls']:<3d} {100 * r['share']:5.1f}%{rate}")
    return "\n".join(lines)
