"""Sampled accuracy of the demo's ``serial`` field per registry value, at a run's checkpoints.

    python experiments/scripts/probe_registry.py sweeps/fc/c0-field_credit=true/seed0 0,30,60

For each step: a copy of the run folder holding only that checkpoint (step 0: none, the base)
is resumed, and 24 test tasks of each registry value (``listed``, ``pending``, ``recalled``,
``unlisted``) are played with 16 sampled episodes each. Prints ``(sampled, greedy)`` accuracy
of the serial field per value. Used in experiments/LOG.md (2026-12-04, thirteenth session).
"""

import json
import os
import shutil
import sys
import tempfile

from mtrl_jax.config import load_config
from mtrl_jax.envs.families import load_tasks
from mtrl_jax.training.trainer import MultiTurnRLTrainer

REGISTRY = ("listed", "pending", "recalled", "unlisted")


def probe(run: str, step: int, per_value: int = 24, samples: int = 16) -> dict:
    tmp = tempfile.mkdtemp()
    try:
        if step > 0:
            shutil.copytree(os.path.join(run, "checkpoints", str(step)),
                            os.path.join(tmp, "checkpoints", str(step)))
        c = load_config(os.path.join(run, "config.json"),
                        [f"output_dir={tmp}", "tracker=none",
                         f"val_sampling_params.num_samples={samples}"])
        t = MultiTurnRLTrainer(config=c, verbose=False)
        try:
            if t.step != step:
                raise SystemExit(f"{run}: resumed at step {t.step}, wanted {step}")
            tasks = t._prep(load_tasks(c.data.task, c.data.test_split, c.data.n_test,
                                       c.data.data_seed))
            out = {}
            for value in REGISTRY:
                sub = [x for x in tasks if x.data["row"]["registry"] == value][:per_value]
                m = t.evaluate("test", tasks=sub, log_metrics=False, log_traces=False)
                out[value] = (round(m["test/sampled/field/serial"], 3),
                              round(m["test/greedy/field/serial"], 3))
            return out
        finally:
            t.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_dir, steps = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    for s in steps:
        print(json.dumps({"run": run_dir, "step": s, "serial": probe(run_dir, s)}), flush=True)
