"""Reads a run's TensorBoard event files with TensorBoard's own loader and prints the scalars.

Usage: tensorboard_read.py LOGDIR  ->  one JSON object on stdout:
  {"files": N, "scalars": {tag: [[step, value, wall_time], ...]}}

TensorBoard's record reader checks both masked CRC-32Cs of every record and its loader parses
the Event protobufs, so this is the reference for `hq_train::tensorboard`.
"""

import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator


def main() -> None:
    logdir = sys.argv[1]
    files = [f for f in os.listdir(logdir) if "tfevents" in f]
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    scalars = {
        tag: [[e.step, e.value, e.wall_time] for e in acc.Scalars(tag)]
        for tag in acc.Tags()[event_accumulator.SCALARS]
    }
    print(json.dumps({"files": len(files), "scalars": scalars}))


if __name__ == "__main__":
    main()
