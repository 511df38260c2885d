"""One worker process of a multi-process hpsearch run in the benchmarks (`peers.py`'s
`processes2` lever): what each child of `hpsearch worker --processes K` runs, an ordinary worker
with its own `--worker-index` and its share of the threads, plus a record of when each epoch's
validation accuracy was known.

    python benchmarks/worker_child.py SPEC.json

SPEC holds the study config (as JSON), the storage URL, the data folder, the worker's index and
threads, the run's wall-clock start (`time.time()`) and budget, and where to write the record.
The parent stops it with SIGTERM at the end of the budget (the worker's own stop path: the running
trial is failed and re-queued, within one batch), and it writes its record on the way out.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import optuna
from rich.console import Console

from hpsearch.config import StudyConfig
from hpsearch.objective import Progress
from hpsearch.progress import Display
from hpsearch.worker import WorkerOptions, run_worker


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start_wall = spec["start_wall"]
    timeline: list[tuple[float, float, int]] = []

    class Timeline(Display):
        def progress(self, p: Progress) -> None:
            timeline.append((time.time() - start_wall, p.val_accuracy, p.trial))
            super().progress(p)

    opts = WorkerOptions(cfg=StudyConfig.model_validate(spec["cfg"]), storage_url=spec["storage_url"],
                         data_dir=spec["data_dir"], device="cpu", threads=spec["threads"],
                         worker_index=spec["worker_index"],
                         timeout=max(spec["budget"] - (time.time() - start_wall), 1.0))
    summary = run_worker(opts, Timeline(Console(file=io.StringIO()), live=False))
    Path(spec["out"]).write_text(json.dumps(dict(timeline=timeline, trials=summary.trials_run)))


if __name__ == "__main__":
    main()
