"""The SOP-Bench format without SOP-Bench data: a domain the tests write themselves.

Loading a user's domain as ``sop_bench:<name>`` (by root or by path), the replayed tools'
answers, the ``*_or_null`` cell type, every validation error of tool maps and CSV files, bad
data and bad arguments reaching the model as ``Error: ...`` instead of ending the episode, and
the tool timeout.
"""

import asyncio
import copy
import json
import os
import time

import pytest

from mtrl_jax.envs import sop
from mtrl_jax.envs.base import ToolError
from mtrl_jax.envs.families import (
    load_tasks,
    make_env,
    reward_kinds,
    sop_bench_folder,
    split_task_name,
)
from mtrl_jax.envs.sop import SopEnvironment, SopFormatError, load_sop_domain
from mtrl_jax.envs.tools import ToolCall
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.sampler import ScriptedSampler

SOP = """\
Returns desk procedure.

For one order (order_id): call lookup_order, then check_policy with the order's
days_since_delivery, then get_courier_note. decision: "refund" if the item is damaged or
days_since_delivery is at most 30, otherwise "reject".
"""


def _spec(name, description, props):
    return {"toolSpec": {"name": name, "description": description, "inputSchema": {"json": {
        "type": "object", "properties": props, "required": list(props)}}}}


ORDER_ID = {"order_id": {"type": "string", "description": "the order"}}
TOOLSPECS = [
    _spec("lookup_order", "The order's item, price and damage flag.", ORDER_ID),
    _spec("check_policy", "Checks the delivery age against the return window.",
          {**ORDER_ID, "days_since_delivery": {"type": "integer"}}),
    _spec("get_courier_note", "The courier's note on the delivery, or null.", ORDER_ID),
]
TOOL_MAP = {
    "source": "written for tests/test_sop_format.py",
    "tools": {
        "lookup_order": {
            "params": ["order_id"], "qualname": "ReturnsDesk.lookup_order",
            "required": [["order_id", "truthy"]], "missing": "Missing order_id",
            "match": [["order_id", "order_id", "str"]], "not_found": "Order {order_id} not found",
            "returns": [["item", "item", "str"], ["price", "price", "float"],
                        ["damaged", "damaged", "bool"]]},
        "check_policy": {
            "params": ["order_id", "days_since_delivery"],
            "qualname": "ReturnsDesk.check_policy",
            "required": [["order_id", "truthy"], ["days_since_delivery", "not_none"]],
            "missing": "Missing order_id or days_since_delivery",
            "match": [["order_id", "order_id", "str"]], "not_found": "Order {order_id} not found",
            "must_equal": [["days_since_delivery", "days_since_delivery", "int",
                            "Wrong delivery age: {value}"]],
            "returns": [["order_id", {"arg": "order_id"}, "str"],
                        ["return_window_days", {"const": 30}, "int"]]},
        "get_courier_note": {  # no params: a call without order_id reaches the lookup
            "match": [["order_id", "order_id", "str"]], "not_found": "No note for {order_id}",
            "returns_value": ["courier_note", "str_or_null"]},
    },
}
HEADER = "order_id,item,price,days_since_delivery,damaged,courier_note,decision\n"
ROWS = [
    'ORD-1,kettle,25.5,3,true,"box crushed, ""fragile"" label",refund\n',
    "ORD-2,lamp,40,45,false,,reject\n",
    "ORD-3,chair,120,10,false,NA,refund\n",
]
CSV = "test_set_with_outputs.csv"


def write_domain(folder, *, edit_map=None, rows=None, tool_map=True):
    """The fixture domain in ``folder``; ``edit_map(map)`` changes a copy of the tool map,
    ``rows`` replaces the CSV's data lines."""
    os.makedirs(folder, exist_ok=True)
    files = {"sop.txt": SOP, "toolspecs.json": json.dumps(TOOLSPECS),
             "metadata.json": json.dumps({"input_columns": ["order_id"],
                                          "output_columns": ["decision"]}),
             CSV: HEADER + "".join(ROWS if rows is None else rows)}
    if tool_map:
        tm = copy.deepcopy(TOOL_MAP)
        if edit_map is not None:
            edit_map(tm)
        files["tool_map.json"] = json.dumps(tm, indent=1)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return str(folder)


@pytest.fixture
def bench_root(tmp_path, monkeypatch):
    """``returns_desk`` under a second MTRL_SOP_BENCH_DIR root (the first one is empty)."""
    empty, root = tmp_path / "empty", tmp_path / "root"
    empty.mkdir()
    write_domain(root / "returns_desk")
    monkeypatch.setenv("MTRL_SOP_BENCH_DIR", f"{empty}{os.pathsep}{root}")
    return root


def call(env, task, name, **args):
    async def go():
        await env.setup(task)
        try:
            return await env.call_tool(ToolCall(name, args))
        except ToolError as e:
            return f"Error: {e}"
        finally:
            await env.teardown()

    return asyncio.run(go())


# ------------------------------------------------------------------------------ loading


def test_a_user_domain_loads_as_sop_bench_by_root_and_by_path(bench_root, tmp_path):
    tasks = load_tasks("sop_bench:returns_desk", "test")
    assert [t.id for t in tasks] == [f"returns_desk/test/{i}" for i in range(3)]
    assert tasks[0].full_name == "sop_bench:returns_desk"
    assert tasks[1].expected == {"decision": "reject"}
    assert tasks[0].prompt.endswith("order_id: ORD-1") and "Returns desk" in tasks[0].system
    assert reward_kinds("sop_bench:returns_desk") == ("dense", "strict")

    other = write_domain(tmp_path / "elsewhere" / "desk2")
    by_path = load_tasks(f"sop_bench:{other}", "test", n=2)
    assert len(by_path) == 2 and by_path[0].name == other
    env = make_env(by_path[0])  # make_env finds the folder again from the task's name
    assert [t.name for t in env.tools()] == ["lookup_order", "check_policy", "get_courier_note"]

    # a user's own domain trains when it has a train split (only SOP-Bench's refuse one)
    with pytest.raises(KeyError, match="has no 'train' split"):
        load_tasks("sop_bench:returns_desk", "train")
    import shutil

    shutil.copy(os.path.join(other, CSV), os.path.join(other, "train_set_with_outputs.csv"))
    assert len(load_tasks(f"sop_bench:{other}", "train")) == len(ROWS)
    with pytest.raises(KeyError, match=r"Did you mean 'returns_desk'.*sop_bench:returns_desk"):
        split_task_name("sop_bench:returns_dsk")


def test_the_package_reads_sop_bench_only_through_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("MTRL_SOP_BENCH_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert sop_bench_folder("customer_service") is None  # ../shared is the tests' business
    with pytest.raises(KeyError, match="MTRL_SOP_BENCH_DIR is not set"):
        load_tasks("sop_bench:customer_service", "test")


def test_reward_kind_is_chosen_through_the_family(bench_root):
    task = load_tasks("sop_bench:returns_desk", "test", n=1)[0]
    assert make_env(task).reward_kind == "dense"
    assert make_env(task, "strict").reward_kind == "strict"
    with pytest.raises(ValueError, match=r"no reward 'strcit'.*Did you mean 'strict'"):
        make_env(task, "strcit")
    assert reward_kinds("math:arith") == ("dense",) == reward_kinds("sql")


# ------------------------------------------------------------------------------ tool results


def test_replayed_tools_answer_as_the_map_says(bench_root):
    task = load_tasks("sop_bench:returns_desk", "test", n=1)[0]
    env = make_env(task)
    assert call(env, task, "lookup_order", order_id="ORD-1") == \
        '{"item": "kettle", "price": 25.5, "damaged": true}'
    assert call(env, task, "lookup_order", order_id="ORD-9") == "Error: Order ORD-9 not found"
    assert call(env, task, "lookup_order", order_id="") == "Error: Missing order_id"
    assert call(env, task, "lookup_order") == (
        "Error: ReturnsDesk.lookup_order() missing 1 required positional argument: "
        "'order_id'")
    assert call(env, task, "check_policy", order_id="ORD-2", days_since_delivery=45) == \
        '{"order_id": "ORD-2", "return_window_days": 30}'
    # not checked against the JSON schema first: the map's own message answers a string
    assert call(env, task, "check_policy", order_id="ORD-2", days_since_delivery="45") == \
        "Error: Wrong delivery age: 45"
    assert call(env, task, "nope") == (
        "Error: Tool 'nope' not found. Available tools: lookup_order, check_policy, "
        "get_courier_note")


def test_or_null_cells_become_json_null(bench_root):
    task = load_tasks("sop_bench:returns_desk", "test", n=1)[0]
    env = make_env(task)
    assert call(env, task, "get_courier_note", order_id="ORD-1") == \
        '"box crushed, \\"fragile\\" label"'
    assert call(env, task, "get_courier_note", order_id="ORD-2") == "null"  # empty cell
    assert call(env, task, "get_courier_note", order_id="ORD-3") == "null"  # NA
    assert sop.convert("", "int_or_null") is None and sop.convert("7", "int_or_null") == 7
    assert sop.convert("NaN", "bool_or_null") is None
    assert sop.convert('{"a": 1}', "json_or_null") == {"a": 1}
    assert sop.convert("", "float") is sop.MISSING  # a plain type: equal to nothing


# ------------------------------------------------------------------------------ validation


def _edit(path, value):
    """A map edit: set the key at ``path`` (a tuple of keys) to ``value`` (``...``: delete)."""

    def edit(tm):
        *parents, last = path
        node = tm
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return edit


def _rename(path, old, new):
    def edit(tm):
        node = tm
        for p in path:
            node = node[p]
        node[new] = node.pop(old)

    return edit


LO = ("tools", "lookup_order")
MAP_ERRORS = [
    pytest.param(_rename((), "tools", "tool"),
                 ["unknown top-level key 'tool'", "Did you mean 'tools'"], id="top-level-key"),
    pytest.param(_rename(LO, "returns", "retruns"),
                 ["tool 'lookup_order'", "unknown key 'retruns'", "Did you mean 'returns'"],
                 id="tool-key"),
    pytest.param(_edit((*LO, "match"), [["order_id", "order_id", "strr"]]),
                 ["tool 'lookup_order'", "match[0]", "unknown cell type 'strr'",
                  "Did you mean 'str'"], id="match-type"),
    pytest.param(_edit((*LO, "returns"), [["price", "price", "flaot"]]),
                 ["tool 'lookup_order'", "returns[0]", "unknown cell type 'flaot'",
                  "Did you mean 'float'"], id="returns-type"),
    pytest.param(_edit(("tools", "get_courier_note", "returns_value"),
                       ["courier_note", "str_or_nul"]),
                 ["tool 'get_courier_note'", "returns_value", "Did you mean 'str_or_null'"],
                 id="or-null-type"),
    pytest.param(_edit((*LO, "required"), [["order_id", "truthey"]]),
                 ["tool 'lookup_order'", "required[0]", "unknown check 'truthey'",
                  "Did you mean 'truthy'"], id="required-check"),
    pytest.param(_edit((*LO, "match"), [["order_id", "order_id"]]),
                 ["tool 'lookup_order'", "match[0]: must be [arg, column, type]"],
                 id="match-entry-shape"),
    pytest.param(_edit((*LO, "match"), "order_id"),
                 ["tool 'lookup_order'", "match: must be a list"], id="match-not-a-list"),
    pytest.param(_edit((*LO, "match"), [["ordr_id", "order_id", "str"]]),
                 ["tool 'lookup_order'", "argument 'ordr_id' is not in params",
                  "Did you mean 'order_id'"], id="argument-name"),
    pytest.param(_edit((*LO, "returns"), [["price", "prise", "float"]]),
                 ["tool 'lookup_order'", "reads column 'prise'", CSV, "Did you mean 'price'"],
                 id="column-name"),
    pytest.param(_edit((*LO, "returns"), [["price", {"args": "order_id"}, "str"]]),
                 ["tool 'lookup_order'", "unknown result source key 'args'",
                  "Did you mean 'arg'"], id="source-key"),
    pytest.param(_edit((*LO, "returns"), ...),
                 ["tool 'lookup_order'", "needs 'returns', 'returns_value'"], id="no-returns"),
    pytest.param(_rename(("tools",), "lookup_order", "lookup_ordr"),
                 ["tool 'lookup_ordr' is not in toolspecs.json", "Did you mean 'lookup_order'"],
                 id="tool-name"),
    pytest.param(_edit(("rows",), "each"), ["'rows' must be 'all' or 'task'"], id="rows"),
]

@pytest.mark.parametrize(("edit", "expected"), MAP_ERRORS)
def test_tool_map_errors_name_the_file_the_tool_and_the_key(tmp_path, edit, expected):
    folder = write_domain(tmp_path / "dom", edit_map=edit)
    with pytest.raises(SopFormatError) as info:
        load_sop_domain(folder)
    msg = str(info.value)
    assert os.path.join(folder, "tool_map.json") in msg
    for part in expected:
        assert part in msg, (part, msg)


def _bad_row(line3: str, *, before=ROWS[:1], after=ROWS[2:]):
    return [*before, line3, *after]


CSV_ERRORS = [
    (_bad_row("ORD-2,lamp,40,45,false,,reject,extra\n"),
     [":3:", "8 fields but the header has 7", "extra value 'extra' after column 'decision'"]),
    (_bad_row("ORD-2,lamp,40,45,false,reject\n"),
     [":3:", "6 fields but the header has 7", "no value for column 'decision'"]),
    (_bad_row('ORD-2,lamp,40,45,false,"never closed,reject\n'),
     [":3:", "column 'courier_note'", "unbalanced quote",
      "runs to the end of the file"]),
    (_bad_row('ORD-2,lamp,40,45,false,"late"ish,reject\n'),
     [":3:", "column 'courier_note'", "text after the closing quote"]),
    (_bad_row("ORD-2,lamp,cheap,45,false,,reject\n"),
     [":3:", "column 'price'", "'cheap' is not a float", "tool 'lookup_order'"]),
    (_bad_row("ORD-2,lamp,40,45,maybe,,reject\n"),
     [":3:", "column 'damaged'", "'maybe' is not a bool"]),
    # a quoted cell over two lines: the next record starts on line 4, and is reported there
    (['ORD-1,kettle,25.5,3,true,"two\nlines",refund\n', "ORD-2,lamp,40,4.5.1,false,,reject\n"],
     [":4:", "column 'days_since_delivery'", "'4.5.1' is not an int", "check_policy"]),
]


@pytest.mark.parametrize(("rows", "expected"), CSV_ERRORS,
                         ids=["extra-field", "missing-field", "unbalanced-quote",
                              "text-after-quote", "bad-float", "bad-bool", "line-after-multiline"])
def test_csv_errors_name_the_file_the_line_and_the_column(tmp_path, rows, expected):
    folder = write_domain(tmp_path / "dom", rows=rows)
    with pytest.raises(SopFormatError) as info:
        load_sop_domain(folder)
    msg = str(info.value)
    assert msg.startswith(os.path.join(folder, CSV) + ":"), msg
    for part in expected:
        assert part in msg, (part, msg)


def test_missing_cells_load_under_every_type(tmp_path):
    """As in SOP-Bench's own data (pandas' NaN): an empty typed cell is not a data error; the
    row is never matched by it, and a tool returning it says so to the model."""
    rows = [*ROWS, "ORD-4,vase,NA,,,,refund\n"]
    dom = load_sop_domain(write_domain(tmp_path / "dom", rows=rows))
    assert len(dom.rows["test"]) == 4


# --------------------------------------------------------------- errors reach the model


def test_bad_data_and_bad_arguments_reach_the_model_not_the_episode(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_domain(root / "returns_desk", rows=[*ROWS, "ORD-4,vase,NA,5,true,,refund\n"])
    monkeypatch.setenv("MTRL_SOP_BENCH_DIR", str(root))
    task = load_tasks("sop_bench:returns_desk", "test")[3]
    script = [
        '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "ORD-4"}}</tool_call>'
        '<tool_call>{"name": "get_courier_note", "arguments": {"id": "ORD-4"}}</tool_call>',
        '<final_output>{"decision": "refund"}</final_output>']
    tok = build_byte_tokenizer()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    sampler = ScriptedSampler(tok, lambda eid, turn, _: script[turn], stop)
    loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=3, sampling_max_tokens=512,
                                                   max_context_tokens=1 << 16))
    traj = asyncio.run(loop.run(make_env(task, "strict"), task, episode_id="e"))

    assert traj.finish_reason == "answered" and traj.error is None and traj.reward == 1.0
    bad_cell, bad_args = traj.tool_calls
    assert bad_cell.result.startswith("Error: tool 'lookup_order' failed: ValueError: column "
                                      "'price' is empty")
    # a not_found template naming an argument the call lacks: KeyError, once a crash
    assert bad_args.result == "Error: tool 'get_courier_note' failed: KeyError: 'order_id'"
    tool_messages = [m["content"] for m in traj.messages if m["role"] == "tool"]
    assert tool_messages == [bad_cell.result, bad_args.result]


def test_a_slow_replayed_tool_times_out(tmp_path, monkeypatch):
    dom = load_sop_domain(write_domain(tmp_path / "dom"))
    real = sop.run_mapping

    def slow(*args):
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(sop, "run_mapping", slow)
    env = SopEnvironment(dom, tool_timeout_s=0.05)
    task = dom.tasks("test")[0]
    t0 = time.perf_counter()
    assert call(env, task, "lookup_order", order_id="ORD-1") == \
        "Error: tool 'lookup_order' timed out after 0.05 s"
    assert time.perf_counter() - t0 < 1.0
    env.tool_timeout_s = 2.0
    assert call(env, task, "lookup_order", order_id="ORD-1").startswith('{"item": "kettle"')
