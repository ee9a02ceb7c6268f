"""Start-up cost of the inference program: how long a user waits before anything happens.

    python tools/bench_startup.py [--runs 5] [--ckpt DIR] [--sections help,generate,imports] [--top 15]

Prints, each a median of `--runs` fresh processes:
  help      wall time of `magi-generate --help` (the console script, when installed) and of
            `python magi_infer/generate.py --help`
  generate  a one-chunk generation with the tiny preset (24 frames, 64x64, on the CPU): start-up, from just
            before the process is started to the first sampler step (the DiT's first forward), and the total
            to exit; beside them `python -c "import torch"`, the part of any start-up that is torch's own
  imports   what that generation imports (`python -X importtime`, one run): the packages by import time (the
            sum of their modules' own times) and the costliest single modules, and whether any of the
            modules inference must not pay for (megatron-core, wandb, transformers, sympy, torch._dynamo)
            was imported

The checkpoint is the tiny preset's random weights in the released layout, written to a temporary folder
unless `--ckpt` names one (a folder this script wrote before, or any tiny checkpoint). Runs one process at a
time with OMP_NUM_THREADS=1. Each figure comes with the process's CPU time (user + system): a loaded machine
inflates wall times much more than CPU times, and on an idle one the two nearly agree (start-up is one thread).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
GENERATE = REPO / "magi_infer" / "generate.py"
# Imports one-process inference must not pay for (README "Start-up").
NOT_FOR_INFERENCE = ("megatron", "wandb", "transformers", "sympy", "torch._dynamo", "torch._inductor")
MARK = "bench_startup: first sampler step at "

# Run in the child: note the time of the DiT's first forward (the sampler's first step), then run the
# program exactly as `python magi_infer/generate.py ...` would (its sys.argv, its __main__).
CHILD = f"""
import os, runpy, sys, time
import magi_train.model.dit as dit
forward = dit.VideoDiT.forward
def first_forward(self, *args, **kwargs):
    if not getattr(dit.VideoDiT, "_bench_seen", False):
        dit.VideoDiT._bench_seen = True
        cpu = os.times()
        print("{MARK}%.6f %.6f" % (time.time(), cpu.user + cpu.system), file=sys.stderr, flush=True)
    return forward(self, *args, **kwargs)
dit.VideoDiT.forward = first_forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: Sequence[str], cwd: Path) -> Tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds, result) of one run; the CPU time is that of the finished child (one at a
    time), which a loaded machine inflates much less than the wall time."""
    cpu, start = _cpu_of_children(), time.time()
    done = subprocess.run(list(cmd), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    seconds = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, _cpu_of_children() - cpu, done


def console_script(name: str) -> Optional[Path]:
    path = Path(sys.executable).with_name(name)
    return path if path.is_file() else None


def bench_help(runs: int, cwd: Path) -> List[Tuple[str, float, float]]:
    """(command, median wall s, median CPU s) of each --help."""
    commands = [("python magi_infer/generate.py --help", [sys.executable, str(GENERATE), "--help"])]
    script = console_script("magi-generate")
    if script is not None:
        commands.insert(0, ("magi-generate --help", [str(script), "--help"]))
    out = []
    for label, cmd in commands:
        times = [_timed(cmd, cwd)[:2] for _ in range(runs)]
        out.append((label, statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)))
    return out


def make_tiny_checkpoint(folder: Path) -> Path:
    """The tiny preset's random weights as a released-layout `inference_weight/` in `folder`."""
    import torch

    from magi_train.checkpoint.magi1 import cast_like_released, save_magi1_checkpoint
    from magi_train.config.compose import load_model_preset
    from magi_train.model.dit import build_dit

    torch.manual_seed(0)
    model = build_dit(load_model_preset("tiny"))
    with torch.no_grad():
        model.final_linear.linear.weight.normal_(0, 0.02)  # zero-initialised otherwise: the video would not move
    save_magi1_checkpoint(cast_like_released(model.state_dict()), folder / "inference_weight")
    return folder


def generation_args(ckpt: Path, out: Path) -> List[str]:
    return [str(GENERATE), "model=tiny", f"ckpt.dir={ckpt}", "num_frames=24", f"output={out}", "overwrite=true",
            "prompt=a red blob moves right", "progress=false"]


def bench_generate(runs: int, ckpt: Path, work: Path) -> Dict[str, float]:
    startup, startup_cpu, total, total_cpu = [], [], [], []
    for i in range(runs):
        start = time.time()
        seconds, cpu, done = _timed([sys.executable, "-c", CHILD, *generation_args(ckpt, work / f"g{i}.mp4")], work)
        marks = [line for line in done.stderr.splitlines() if line.startswith(MARK)]
        if not marks:
            raise SystemExit(f"no sampler step was seen in the generation's output:\n{done.stderr[-3000:]}")
        at, cpu_at = (float(v) for v in marks[0][len(MARK):].split())
        startup.append(at - start)
        startup_cpu.append(cpu_at)
        total.append(seconds)
        total_cpu.append(cpu)
    # The floor no start-up can go under: a bare interpreter importing torch.
    floor = [_timed([sys.executable, "-c", "import torch"], work)[:2] for _ in range(runs)]
    return {"startup_s": statistics.median(startup), "startup_cpu_s": statistics.median(startup_cpu),
            "total_s": statistics.median(total), "total_cpu_s": statistics.median(total_cpu),
            "torch_s": statistics.median(t[0] for t in floor), "torch_cpu_s": statistics.median(t[1] for t in floor)}


def parse_importtime(stderr: str) -> List[Tuple[str, int, int]]:
    """(module, self µs, cumulative µs) of every `-X importtime` line."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        rows.append((name.strip(), int(self_us), int(cumulative_us)))
    return rows


def bench_imports(ckpt: Path, work: Path, top: int) -> Dict[str, object]:
    cmd = [sys.executable, "-X", "importtime", *generation_args(ckpt, work / "imports.mp4")]
    rows = parse_importtime(_timed(cmd, work)[2].stderr)
    by_package: Dict[str, int] = defaultdict(int)
    for name, self_us, _ in rows:
        by_package[name.split(".")[0]] += self_us
    return {
        "total_s": sum(s for _, s, _ in rows) / 1e6,
        "packages": sorted(by_package.items(), key=lambda kv: -kv[1])[:top],
        "modules": sorted(((n, s) for n, s, _ in rows), key=lambda kv: -kv[1])[:top],
        "unwanted": [m for m in NOT_FOR_INFERENCE if any(n == m or n.startswith(m + ".") for n, _, _ in rows)],
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per figure (median)")
    parser.add_argument("--ckpt", type=Path, help="a tiny checkpoint folder (default: random weights, written now)")
    parser.add_argument("--sections", default="help,generate,imports", help="comma-separated: help, generate, imports")
    parser.add_argument("--top", type=int, default=15, help="rows of the import tables")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    unknown = sections - {"help", "generate", "imports"}
    if unknown or args.runs < 1:
        parser.error(f"--sections takes help, generate, imports (got {sorted(unknown)}); --runs must be >= 1")
    report: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        work = Path(tmp)  # the programs run here, outside the repository, as a user's would
        if "help" in sections:
            report["help"] = bench_help(args.runs, work)
            for label, seconds, cpu in report["help"]:
                print(f"{label:40s} {seconds:6.2f} s  (CPU {cpu:.2f} s; median of {args.runs})")
        if sections & {"generate", "imports"}:
            ckpt = args.ckpt or make_tiny_checkpoint(work / "tiny")
        if "generate" in sections:
            g = report["generate"] = bench_generate(args.runs, ckpt, work)
            print(f"{'one-chunk tiny generation: start-up':40s} {g['startup_s']:6.2f} s  (CPU {g['startup_cpu_s']:.2f} s; "
                  f"process start -> first sampler step; median of {args.runs})")
            print(f"{'one-chunk tiny generation: total':40s} {g['total_s']:6.2f} s  (CPU {g['total_cpu_s']:.2f} s)")
            print(f"{'import torch alone (the floor)':40s} {g['torch_s']:6.2f} s  (CPU {g['torch_cpu_s']:.2f} s)")
        if "imports" in sections:
            imp = report["imports"] = bench_imports(ckpt, work, args.top)
            print(f"\nimports of that generation: {imp['total_s']:.2f} s (sum of -X importtime self times, one run)")
            print("  by package:  " + ", ".join(f"{name} {us / 1e6:.2f} s" for name, us in imp["packages"]))
            print("  costliest modules (own time):")
            for name, us in imp["modules"]:
                print(f"    {us / 1e3:8.1f} ms  {name}")
            print("  not for inference, imported: " + (", ".join(imp["unwanted"]) or "none"))
    return report


if __name__ == "__main__":
    main()
