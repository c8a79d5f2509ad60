"""Wall time of one `compare` grid run serially, on a local Ray with 1 worker and with 2 workers.

Each mode starts from an empty cache (the base is pretrained once, before timing); Ray's start-up
is inside the timed span. The three result sets must be identical (1 torch thread per run).

    python scripts/bench_ray_workers.py --backbone cnn1d --steps 100 --out runs/ray_workers
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from toolchain.compare import CompareJob, compare_tasks
from toolchain.grid.runner import GridOptions, run_grid

DROP = ("train_seconds", "seconds_per_step", "history_seconds", "step_seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="cnn1d")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="runs/ray_workers")
    a = ap.parse_args()
    job = CompareJob(out=a.out, backbone=a.backbone, steps=a.steps, eval_every=10, pretrain_epochs=2, progress=False)
    tasks = compare_tasks(job)
    results, lines = {}, []
    for name, ray, workers in (("serial", None, None), ("ray, 1 worker", "auto", 1), ("ray, 2 workers", "auto", 2)):
        cache = Path(a.out) / f"cache_{name.replace(', ', '_').replace(' ', '')}"
        shutil.rmtree(cache, ignore_errors=True)
        res = run_grid(tasks, cache, GridOptions(ray=ray, workers=workers, progress=False), name)
        results[name] = [{k: v for k, v in r.items() if k not in DROP} for r in res.ok]
        lines.append(
            {"mode": name, "runs": len(res.ok), "failed": len(res.failed), "wall_seconds": round(res.seconds, 1)}
        )
        print(json.dumps(lines[-1]), flush=True)
    same = all(results[k] == results["serial"] for k in results)
    print(
        json.dumps(
            {
                "identical_results": same,
                "speedup_2_vs_1_workers": round(lines[1]["wall_seconds"] / lines[2]["wall_seconds"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
