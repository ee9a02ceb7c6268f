"""One GPU benchmark and check: the GPU tests, then attention, training and inference figures, in one JSON and
one markdown table.

    python tools/gpu_bench.py --out bench_out [--budget-s 480] [--skip-tests]    (make gpu-bench)
    python tools/gpu_bench.py --dry-run --out /tmp/b                              (CPU, tiny sizes, seconds)

On one H100/H200, in at most --budget-s seconds (8 minutes), needing only torch (transformer-engine,
flash-attn, MagiAttention used where importable):

    tests        pytest tests/gpu in a subprocess (its summary line and exit status)
    attention    TFLOP/s forward and backward on MAGI-1's block-causal mask (head dim 128; 16k, 32k, 64k tokens
                 in chunks of 2048) for every attention backend, "unavailable: why" where one does not run
    train        the trainer's step (Trainer.train_step) of the 4.5B preset at full width with 2 layers, bf16 and
                 fp8 (trainer.fp8_recipe + model.layer_spec=te where transformer_engine imports): step time,
                 MFU (observability/flops.py over throughput.peak_flops_per_device), and peak memory
                 (torch.cuda.max_memory_allocated) against the planner's estimate (observability/memory_check.py)
    inference    a no-grad forward of the 4.5B distill configuration (2 layers, bf16) over a 3-chunk sample:
                 MFU and per-chunk latency

Every section has its share of the budget and records its failure (or "skipped: ...") instead of stopping the
run; a section that starts late gets what is left. --dry-run runs every section at tiny sizes on the CPU (the
GPU tests are skipped: they skip without CUDA anyway) and writes the same JSON / markdown shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: tools/ and the package beside it

# Shares of the budget, in the order the sections run (what one leaves unspent goes to the next ones).
SHARES = {"tests": 0.30, "attention": 0.30, "train": 0.28, "inference": 0.12}
SCHEMA_VERSION = 1


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def section_deadline(self, name: str) -> float:
        """Now + this section's share of what is left, in proportion to the shares of the sections to come."""
        names = list(SHARES)
        rest = sum(SHARES[n] for n in names[names.index(name):])
        return time.monotonic() + max(0.0, self.left()) * SHARES[name] / rest


def run_tests(deadline: float, dry_run: bool, skip: bool) -> Dict:
    if dry_run or skip:
        return {"status": "skipped: " + ("--dry-run" if dry_run else "--skip-tests")}
    timeout = max(10.0, deadline - time.monotonic())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        return {"status": f"failed: tests/gpu ran past its {timeout:.0f} s budget",
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"passed|failed|skipped|error|no tests", ln)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", summary)}
    return {"status": "ok" if proc.returncode == 0 else f"failed: pytest exit status {proc.returncode}",
            "returncode": proc.returncode, "summary": summary.strip("= "), "counts": counts,
            "output_tail": "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:]}


def guarded(name: str, fn: Callable[[], object]):
    """fn()'s result, or {"status": "failed: ..."} (with the traceback's tail) if it raises."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a section's failure is a result, the others still run
        return {"status": f"failed: {type(exc).__name__}: {str(exc)[:500]}",
                "traceback": traceback.format_exc()[-3000:]}


def te_available() -> str:
    """"" when transformer_engine imports, else why not."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install: either way unavailable
        return f"unavailable: transformer_engine does not import ({type(exc).__name__}: {str(exc)[:200]})"
    return ""


def collect(args) -> Dict:
    import torch

    from magi_train.observability.throughput import peak_flops_per_device
    from tools import gpu_bench_sections as sec

    dry = args.dry_run
    budget = Budget(args.budget_s)
    if not dry and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --dry-run to check the script on a CPU)")
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    sizes = sec.DRY_SIZES if dry else sec.GPU_SIZES
    dtype = torch.float32 if dry else torch.bfloat16
    peak = peak_flops_per_device(args.peak_tflops, device)
    report: Dict = {
        "schema_version": SCHEMA_VERSION, "dry_run": dry, "budget_s": args.budget_s,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "peak_tflops": peak / 1e12 if peak else None, "sections": {},
    }
    sections = report["sections"]

    deadline = budget.section_deadline("tests")
    t0 = time.monotonic()
    sections["tests"] = guarded("tests", lambda: run_tests(deadline, dry, args.skip_tests))
    sections["tests"]["seconds"] = time.monotonic() - t0

    deadline = budget.section_deadline("attention")
    t0 = time.monotonic()
    rows = guarded("attention", lambda: sec.attention(sizes, device, dtype, lambda: deadline))
    sections["attention"] = {"status": "ok", "rows": rows} if isinstance(rows, list) else rows
    sections["attention"]["seconds"] = time.monotonic() - t0

    deadline = budget.section_deadline("train")
    t0 = time.monotonic()
    train: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, precision, recipe in (("bf16", "bf16", "none"), ("fp8", "bf16", args.fp8_recipe)):
            why = te_available() if recipe != "none" else ""
            if dry and recipe != "none":
                why = why or "unavailable: fp8 needs CUDA (dry run on the CPU)"
            if why:
                train[name] = {"status": why}
            elif time.monotonic() > deadline:
                train[name] = {"status": "skipped: section time budget spent"}
            else:
                train[name] = guarded(name, lambda: sec.train_step(sizes, device, os.path.join(tmp, name), precision,
                                                                    recipe, lambda: deadline))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    sections["train"] = {"status": "ok" if all(v["status"] == "ok" or v["status"].startswith("unavailable")
                                               for v in train.values()) else "failed", "runs": train,
                         "seconds": time.monotonic() - t0}

    deadline = budget.section_deadline("inference")
    t0 = time.monotonic()
    sections["inference"] = guarded("inference", lambda: sec.inference(sizes, device, dtype, peak, lambda: deadline))
    sections["inference"]["seconds"] = time.monotonic() - t0
    report["seconds"] = time.monotonic() - budget.start
    return report


def _fmt(value, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(report: Dict) -> str:
    s = report["sections"]
    out: List[str] = [f"# GPU benchmark: {report['device']}", "",
                      f"torch {report['torch']}, peak {_fmt(report['peak_tflops'])} TFLOP/s, "
                      f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget"
                      + (" (dry run: tiny sizes on the CPU)" if report["dry_run"] else ""), ""]
    t = s["tests"]
    out += ["## tests/gpu", "", f"{t['status']}" + (f": {t['summary']}" if t.get("summary") else ""), ""]
    out += ["## Attention (block-causal, one sample)", "",
            "| backend | tokens | head dim | fwd TFLOP/s | bwd TFLOP/s | fwd ms | bwd ms | status |",
            "|---|---|---|---|---|---|---|---|"]
    for r in s["attention"].get("rows", []):
        out.append(f"| {r['backend']} | {r['tokens']} | {r['head_dim']} | {_fmt(r.get('forward_tflops'), '.4g')} | "
                   f"{_fmt(r.get('backward_tflops'), '.4g')} | {_fmt(r.get('forward_ms'), '.2f')} | "
                   f"{_fmt(r.get('backward_ms'), '.2f')} | {r['status']} |")
    if "rows" not in s["attention"]:
        out.append(f"| - | - | - | - | - | - | - | {s['attention']['status']} |")
    out += ["", "## Training step (Trainer.train_step)", "",
            "| run | layers x width | tokens | attention | step ms | TFLOP/s | MFU | peak GiB | estimate GiB | "
            "peak / estimate | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    for name, r in s["train"]["runs"].items():
        width = f"{r['layers']} x {r['hidden_size']}" if "layers" in r else "-"
        out.append(f"| {name} | {width} | {_fmt(r.get('tokens'), 'd')} | {_fmt(r.get('attention_backend'))} | "
                   f"{_fmt(r.get('step_ms'))} | {_fmt(r.get('tflops_per_device'), '.4g')} | {_fmt(r.get('mfu'), '.3f')} | "
                   f"{_fmt(gib(r.get('peak_bytes')), '.2f')} | {_fmt(gib(r.get('estimate_bytes')), '.2f')} | "
                   f"{_fmt(r.get('peak_over_estimate'), '.2f')} | {r['status']} |")
    i = s["inference"]
    out += ["", "## Inference forward (distill configuration)", "",
            "| layers | dtype | tokens | chunks | forward ms | per-chunk ms | TFLOP/s | MFU | status |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {_fmt(i.get('layers'), 'd')} | {_fmt(i.get('dtype'))} | {_fmt(i.get('tokens'), 'd')} | "
            f"{_fmt(i.get('chunks'), 'd')} | {_fmt(i.get('forward_ms'))} | {_fmt(i.get('per_chunk_ms'), '.2f')} | "
            f"{_fmt(i.get('tflops'), '.4g')} | {_fmt(i.get('mfu'), '.3f')} | {i['status']} |", ""]
    return "\n".join(out)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory for gpu_bench.json and gpu_bench.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, no GPU tests")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (s)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/gpu")
    ap.add_argument("--fp8-recipe", default="tensorwise", help="trainer.fp8_recipe of the fp8 training run")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's bf16 peak (TFLOP/s)")
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be positive, got {args.budget_s}")
    report = collect(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_bench.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.md'}")
    return report


if __name__ == "__main__":
    main()
