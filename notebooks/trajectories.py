# %% [markdown]
# # What did the agent do? A run's trajectories, read back from MLflow traces
#
# Percent-format notebook (open in Jupyter through jupytext, or run as a script). Every training
# run logs sampled episodes as MLflow traces (`trace_samples_per_step`, plus evaluation
# episodes): one root `AGENT` span per episode (task, reward, strict score, finish reason), an
# `LLM` span per assistant turn and a `TOOL` span per tool call under the turn that made it.
# This notebook reads them back and asks: how many turns and tool calls did episodes take,
# which tools failed, and where do the training reward and the strict task score disagree?
# (RL optimises the reward literally: an episode with a high reward and a failed task is where
# the reward leaks.)
#
# Parameters (environment variables): `MTRL_NB_RUN` a run folder holding `mlflow.db` (its
# newest run; default `runs/demo`) or a run id with `MLFLOW_TRACKING_URI` set;
# `MTRL_NB_REWARD_PASS` the reward at which an episode counts as a success for the reward
# (default 0.5).

# %%
import collections
import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

RUN = os.environ.get("MTRL_NB_RUN", "runs/demo")
REWARD_PASS = float(os.environ.get("MTRL_NB_REWARD_PASS", "0.5"))
if os.path.isdir(RUN):
    db = os.path.join(RUN, "mlflow.db")
    if not os.path.exists(db):
        raise FileNotFoundError(f"{RUN} holds no mlflow.db: train a run first (mtrl demo), or "
                                "set MTRL_NB_RUN to a run folder or run id")
    uri = "sqlite:///" + os.path.abspath(db)
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], order_by=["start_time DESC"],
                                        max_results=1)]
    run = max(runs, key=lambda r: r.info.start_time)
else:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    run = client.get_run(RUN)
mlflow.set_tracking_uri(uri)
traces = mlflow.search_traces(run_id=run.info.run_id, locations=[run.info.experiment_id],
                              return_type="list")
print(f"run {run.info.run_name} ({run.info.run_id}): {len(traces)} traces")

# %% [markdown]
# ## One row per episode
# From each trace: the root span's attributes, and its turn and tool spans counted.

# %%
rows, tool_rows = [], []
for tr in traces:
    spans = tr.data.spans
    root = next(s for s in spans if s.parent_id is None)
    turns = {s.span_id: s for s in spans if s.name.startswith("turn ")}
    tools = [s for s in spans if s.name.startswith("tool ")]
    assert all(t.parent_id in turns for t in tools), "a tool span outside its turn"
    a = root.attributes
    rows.append(dict(trace_id=tr.info.trace_id, episode_id=a["episode_id"], task_id=a["task_id"],
                     kind=a["kind"], step=a["step"], reward=a["reward"],
                     strict=a["strict_score"], finish=a["finish_reason"],
                     turns=len(turns), turns_attr=a["num_turns"], tool_calls=len(tools),
                     tool_errors=sum(bool(t.attributes.get("error")) for t in tools),
                     sampled_tokens=a["sampled_tokens"]))
    for t in tools:
        tool_rows.append(dict(episode_id=a["episode_id"], tool=t.name.removeprefix("tool "),
                              error=t.attributes.get("error") or "",
                              turn=turns[t.parent_id].attributes.get("turn")))
episodes = pd.DataFrame(rows).sort_values(["kind", "step", "episode_id"], ignore_index=True)
tool_calls = pd.DataFrame(tool_rows, columns=["episode_id", "tool", "error", "turn"])
assert (episodes.turns == episodes.turns_attr).all(), "turn spans and num_turns disagree"
episodes.drop(columns="turns_attr").head(12)

# %% [markdown]
# ## Turns, tool calls and scores by kind of episode (training samples, evaluation)

# %%
by_kind = episodes.groupby("kind").agg(
    episodes=("episode_id", "count"), turns=("turns", "mean"), tool_calls=("tool_calls", "mean"),
    tool_errors=("tool_errors", "sum"), reward=("reward", "mean"), strict=("strict", "mean"),
    tokens=("sampled_tokens", "mean"))
print(by_kind.round(3).to_string())
print()
print("finish reasons:", dict(collections.Counter(episodes.finish)))
per_tool = (tool_calls.assign(failed=tool_calls.error != "")
            .groupby("tool").agg(calls=("tool", "count"), failed=("failed", "sum")))
print(per_tool.to_string() if len(per_tool) else "no tool calls in these episodes")

# %% [markdown]
# ## Reward vs strict score
# The reward (dense: partial credit per field and for format) against the strict exact-match
# score the external evaluation uses. Episodes where they disagree: the reward passes
# (>= `REWARD_PASS`) but the task failed, or the task succeeded with a low reward.

# %%
scored = episodes.dropna(subset=["strict"])
if len(scored) >= 2 and scored.reward.std() > 0 and scored.strict.std() > 0:
    corr = float(np.corrcoef(scored.reward, scored.strict)[0, 1])
else:
    corr = float("nan")
confusion = pd.crosstab(scored.reward >= REWARD_PASS, scored.strict >= 1.0,
                        rownames=[f"reward >= {REWARD_PASS}"], colnames=["strict success"])
print(f"{len(scored)} scored episodes, correlation of reward and strict score {corr:.3f}")
print(confusion.to_string())
disagree = scored[(scored.reward >= REWARD_PASS) != (scored.strict >= 1.0)]
print(f"\n{len(disagree)} episodes where they disagree:")
print(disagree[["episode_id", "task_id", "kind", "step", "reward", "strict", "turns",
                "tool_calls", "finish"]].to_string(index=False))

# %% [markdown]
# ## One disagreeing episode, turn by turn
# The turn spans carry the assistant's text, the tool spans the call and its result.

# %%
def show_episode(trace_id):
    tr = next(t for t in traces if t.info.trace_id == trace_id)
    spans = sorted(tr.data.spans, key=lambda s: s.start_time_ns)
    root = next(s for s in spans if s.parent_id is None)
    print(f"task: {str(root.inputs.get('task'))[:300]}")
    for s in spans:
        if s.name.startswith("turn "):
            print(f"[{s.name}] assistant: {str((s.outputs or {}).get('content'))[:300]}")
        elif s.name.startswith("tool "):
            out = str((s.outputs or {}).get("result"))[:200]
            print(f"    [{s.name}] args {s.inputs.get('arguments')} -> {out}")
    print(f"final: {root.outputs.get('final')!r}; reward {root.outputs.get('reward')}, "
          f"strict {root.outputs.get('strict_score')}")


if len(disagree):
    show_episode(disagree.trace_id.iloc[0])
