"""Each teacher mode: load time, rows/s and peak memory, one subprocess per mode.

    python -m bench.teachers --rows 200

Modes: minilm fp32, smollm2 fp32, smollm2 8-bit and 4-bit (bitsandbytes; the GGUF is first
converted once to a cached safetensors folder, which this bench triggers if needed). Each mode
runs in its own process so that its peak RSS is its own; rows/s are comparable only within one
run of this script on one machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = [("minilm", "none"), ("smollm2", "none"), ("smollm2", "8bit"), ("smollm2", "4bit")]


def child(name: str, quantize: str, rows: int, batch_size: int) -> None:
    from bench.embed_throughput import texts
    from cube.teachers import HFTeacher, TeacherConfig

    start = time.perf_counter()
    teacher = HFTeacher(TeacherConfig(name=name, quantize=quantize))
    load = time.perf_counter() - start
    data = texts(rows)
    teacher.embed(data[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, rows, batch_size):
        teacher.embed(data[i : i + batch_size])
    rate = rows / (time.perf_counter() - start)
    print(json.dumps({"teacher": name, "quantize": quantize, "load_s": load, "rows_per_s": rate,
                      "weights_mib": teacher.model.get_memory_footprint() / 2**20,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--child", nargs=2, metavar=("NAME", "QUANTIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.rows, args.batch_size)
        return
    print(f"{'teacher':<9} {'quantize':<8} {'load s':>7} {'rows/s':>8} {'weights MiB':>12} {'peak RSS MiB':>13}")
    for name, quantize in MODES:
        out = subprocess.run([sys.executable, "-m", "bench.teachers", "--rows", str(args.rows), "--batch-size",
                              str(args.batch_size), "--child", name, quantize], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:<9} {quantize:<8} FAILED: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:<9} {quantize:<8} {r['load_s']:>7.1f} {r['rows_per_s']:>8.1f} {r['weights_mib']:>12.0f} "
            f"{r['peak_rss_mib']:>13.0f}"
        )


if __name__ == "__main__":
    main()
