"""runner/launch.py's main_process_first with four real processes on two "machines" (gloo): the job's main
process first, then the other machine's main process, then the rest; what goes to a machine's cache is made
once per machine."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path


def _process(rank: int, folder: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from runner.launch import main_process_first, part

    machine_cache = Path(folder) / f"cache-{rank // 2}"   # machines 0 (ranks 0, 1) and 1 (ranks 2, 3)
    with main_process_first():
        made = not machine_cache.exists()
        if made:
            time.sleep(0.5)                              # a slow conversion: nobody may read it meanwhile
            machine_cache.mkdir()
        with open(Path(folder) / "order.jsonl", "a") as log:
            log.write(json.dumps({"rank": rank, "made": made, "t": time.time()}) + "\n")
    part()


def test_cache_work_runs_once_per_machine_main_process_first(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process, args=(rank, str(tmp_path), 29581)) for rank in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    rows = [json.loads(line) for line in (tmp_path / "order.jsonl").read_text().splitlines()]
    order = [r["rank"] for r in sorted(rows, key=lambda r: r["t"])]
    assert order[:2] == [0, 2] and sorted(order[2:]) == [1, 3]
    assert {r["rank"]: r["made"] for r in rows} == {0: True, 1: False, 2: True, 3: False}
