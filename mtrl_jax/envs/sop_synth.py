"""Synthetic SOP domains: our own training data, in the SOP-Bench on-disk format.

Seeded and of any size, with train/val/test splits written as ``{split}_set_with_outputs.csv``
beside ``sop.txt``, ``toolspecs.json``, ``metadata.json`` and ``tool_map.json``, so the same
loader and replayed tools (:mod:`mtrl_jax.envs.sop`) serve them and SOP-Bench.

Domains:

- ``aircraft_inspection`` -- six output fields. Five checks read tool outputs and apply a rule
  (a weight within 1 kg of its expected value, a battery ``operational``/``nominal``, serial
  numbers equal, pressure at or above the minimum, no open defects and service within 180 days);
  the sixth (``ready``) combines them. Borderline cases (a 1 kg vs a 2 kg difference, pressure
  equal to the minimum) are frequent, so copying a tool value never suffices.
- ``aircraft_manual`` -- the same checks, rows and tools as ``aircraft_inspection`` inside a
  maintenance-manual chapter (definitions, general rules, notes, a reference table, escalation,
  revision history): a ~2,000-token procedure, the long prompt that every episode of a group
  shares (the workload of shared-prefix packing and prefill).
- ``preflight`` -- a compact aircraft check for tiny demo models (three tools, four fields, short
  ids and codes that a word-level vocabulary holds as single tokens). Each check applies a rule
  to a tool's value (a deviation threshold, status sets); borderline values (deviation 1 or 2,
  ``nominal`` / ``degraded``, ``pending`` / ``recalled``) are frequent. Ids repeat across rows,
  so its tools answer from the episode's own row (``"rows": "task"`` in ``tool_map.json``).
- ``loan_triage`` -- the answer is computed from tool outputs: a debt-to-income band and a
  decision from thresholds on that ratio, the credit score and recent defaults.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable

DOMAINS = ("aircraft_inspection", "aircraft_manual", "loan_triage", "preflight")
#: Bumped whenever a generator's output changes, so cached copies are regenerated.
VERSIONS = {"aircraft_inspection": 1, "aircraft_manual": 1, "loan_triage": 1, "preflight": 3}


def _spec(name: str, description: str, arg: str, arg_desc: str) -> dict:
    return {"toolSpec": {"name": name, "description": description, "inputSchema": {"json": {
        "type": "object", "properties": {arg: {"type": "string", "description": arg_desc}},
        "required": [arg]}}}}


# ----------------------------------------------------------------------- aircraft inspection

AIRCRAFT_SOP = """\
Aircraft pre-flight inspection procedure.

You inspect one aircraft, identified by its aircraft_id. Use the tools to read each system,
then record one result per check:

1. mechanical: call inspect_mechanical. "pass" if the component weight differs from the
   expected weight by at most 1 kg, otherwise "fail".
2. electrical: call inspect_electrical. "pass" if the battery status is "operational" or
   "nominal", otherwise "fail".
3. serial: call verify_serial. "match" if the installed serial equals the logged serial
   exactly, otherwise "mismatch".
4. hydraulics: call check_hydraulics. "pass" if the pressure is at or above the minimum,
   otherwise "fail".
5. maintenance: call review_maintenance_log. "pass" if there are no open defects and the last
   service was at most 180 days ago, otherwise "fail".
6. ready: "yes" only if mechanical, electrical, hydraulics and maintenance are "pass" and
   serial is "match"; otherwise "no".
"""


def _aircraft_row(rng: random.Random, i: int) -> dict[str, str]:
    aid = f"AC-{rng.randint(1000, 9999)}-{i}"
    expected_w = rng.randint(40, 120)
    diff = rng.choice([0, 0, 1, -1, 1, 2, -2, 3, -5])
    battery = rng.choice(["operational", "operational", "nominal", "degraded", "failed"])
    logged = f"{rng.choice('ABCDEFGH')}{rng.randint(1, 9)}{rng.randint(0, 9)}"
    installed = logged if rng.random() < 0.7 else \
        f"{logged[0]}{logged[1]}{(int(logged[2]) + rng.randint(1, 8)) % 10}"
    minimum = rng.choice([2800, 2900, 3000])
    pressure = minimum + rng.choice([0, 50, 120, 200, -10, -60])
    defects = rng.choice([0, 0, 0, 1, 2])
    service_days = rng.choice([30, 90, 150, 180, 181, 240])
    mech = "pass" if abs(diff) <= 1 else "fail"
    elec = "pass" if battery in ("operational", "nominal") else "fail"
    ser = "match" if installed == logged else "mismatch"
    hyd = "pass" if pressure >= minimum else "fail"
    maint = "pass" if defects == 0 and service_days <= 180 else "fail"
    ready = "yes" if (mech, elec, ser, hyd, maint) == ("pass", "pass", "match", "pass",
                                                          "pass") else "no"
    return {"aircraft_id": aid, "component_weight_kg": str(expected_w + diff),
            "expected_weight_kg": str(expected_w), "battery_status": battery,
            "installed_serial": installed, "logged_serial": logged,
            "pressure_psi": str(pressure), "minimum_psi": str(minimum),
            "open_defects": str(defects), "last_service_days": str(service_days),
            "mechanical": mech, "electrical": elec, "serial": ser, "hydraulics": hyd,
            "maintenance": maint, "ready": ready}


AIRCRAFT = dict(
    sop=AIRCRAFT_SOP,
    key="aircraft_id",
    inputs=["aircraft_id"],
    outputs=["mechanical", "electrical", "serial", "hydraulics", "maintenance", "ready"],
    tools=[
        ("inspect_mechanical", "Weighs the inspected component and reads its expected weight.",
         [("component_weight_kg", "int"), ("expected_weight_kg", "int")]),
        ("inspect_electrical", "Reads the battery status.", [("battery_status", "str")]),
        ("verify_serial", "Reads the installed and the logged serial numbers.",
         [("installed_serial", "str"), ("logged_serial", "str")]),
        ("check_hydraulics", "Reads the hydraulic pressure and its minimum.",
         [("pressure_psi", "int"), ("minimum_psi", "int")]),
        ("review_maintenance_log", "Reads open defects and days since the last service.",
         [("open_defects", "int"), ("last_service_days", "int")]),
    ],
    row=_aircraft_row,
    not_found="Aircraft {key} not found",
)

# ----------------------------------------------------------------------- aircraft manual

_MANUAL_HEAD = """\
Line maintenance manual, chapter 5: pre-flight airworthiness inspection.

5.1 Scope. This chapter applies to every aircraft of the fleet before its first flight of the
day and before any flight that follows an overnight stop, a component change, a hard landing
report or a ground incident. It tells the inspector which systems to read, how to judge each
reading, and how the result is recorded. It does not replace the type-specific task cards; where
a task card is stricter than this chapter, the task card governs. Inspectors hold a current
line authorisation for the aircraft family and sign the record under their own licence number.

5.2 Definitions.
- Inspector: the licensed engineer who performs the checks and signs the record.
- Reading: a value returned by an inspection tool for the aircraft under inspection. A reading
  is taken as returned; it is never rounded, estimated or copied from an earlier record.
- Expected weight: the weight recorded for the installed component at its last fitting.
- Deviation: the absolute difference between the measured and the expected component weight.
- Battery status: the state reported by the battery monitoring unit. The unit reports one of
  "operational", "nominal", "degraded" or "failed".
- Installed serial: the serial number read from the component plate. Logged serial: the serial
  number held in the configuration record for that position.
- Minimum pressure: the lowest hydraulic system pressure at which the aircraft may be released,
  as returned with the pressure reading for that aircraft.
- Open defect: a deferred or unresolved defect entry in the technical log.
- Days since service: the number of calendar days since the last scheduled service was signed.
- Release: the statement that the aircraft is ready for flight.

5.3 General rules.
(a) Read every system with its tool, even when an earlier inspection of the same day passed.
(b) Judge each check from the readings of this inspection only.
(c) Record exactly one result per check, using only the words given for that check.
(d) A check whose reading cannot be obtained is recorded as failed, and the aircraft is not
    released.
(e) Borderline readings are judged by the rule as written: a value equal to a limit is within
    the limit where the rule says "at most" or "at or above", and outside it otherwise.
(f) Do not record a release before all five system checks have a result.

5.4 The checks. Use the tools to read each system, then record one result per check:

{checks}
5.5 Notes on the checks.
- Mechanical. A weight change of more than 1 kg usually means a wrong part, a missing
  fastener set, fluid contamination or an unrecorded modification. Do not re-weigh to obtain
  a passing value; the first complete reading is the one recorded.
- Electrical. A "degraded" battery may still start the auxiliary power unit, but it is not
  accepted for release. A "failed" status is recorded as failed even when the aircraft has
  ground power connected.
- Serial. Compare character by character, including letters and leading digits. A serial
  that differs only in one digit is a mismatch: it indicates either an unrecorded component
  change or a recording error, and both stop the release until resolved.
- Hydraulics. The minimum depends on the aircraft variant and is returned with the reading.
  Use the minimum returned for this aircraft, not a value from a table in this manual.
- Maintenance. One open defect of any category fails the check for the purpose of this
  inspection, even if the defect was deferred under the minimum equipment list. Service at
  exactly 180 days passes; service at 181 days fails.

5.6 Reference data by aircraft variant (for planning only; the tools return the values that
apply to the aircraft under inspection, and those values govern):
"""

_MANUAL_TAIL = """
5.7 Recording the result. Enter the six results in the inspection record in the order of
section 5.4. Sign the record with the licence number and the local time of completion. When
the aircraft is not released, add a short reason naming every failed check, and notify the
maintenance controller before the crew is called for boarding.

5.8 Escalation. The inspector escalates to the shift supervisor when the same check fails on
two consecutive days for the same aircraft, when a serial mismatch cannot be explained from
the technical log within thirty minutes, or when a reading is out of range for the tool
(for example a negative weight or a pressure above the gauge maximum). Escalation does not
change the recorded result of this inspection.

5.9 Revision history:
"""


def _manual_sop(seed: int = 5) -> str:
    """The aircraft checks inside a maintenance-manual chapter (~2,000 tokens): the same rules
    as ``aircraft_inspection``, the long shared prompt of a real SOP. Seeded and fixed."""
    rng = random.Random(f"aircraft_manual:{seed}")
    lines = ["variant | max take-off weight (kg) | battery unit | typical minimum pressure (psi)"
             " | scheduled service interval (days)"]
    for k in range(24):
        lines.append(f"AX-{100 + 10 * k} | {rng.randrange(18000, 79000, 500)} | "
                     f"BMU-{rng.randint(2, 9)}{rng.choice('ABC')} | "
                     f"{rng.choice([2800, 2900, 3000])} | {rng.choice([90, 120, 150, 180])}")
    history = []
    for k in range(8):
        history.append(f"- Revision {k + 1}, month {rng.randint(1, 12)} of year {2015 + k}: "
                       + rng.choice(["definitions of open defect aligned with the technical log",
                                     "hydraulic minimum taken from the reading, not the table",
                                     "serial comparison made character by character",
                                     "battery states renamed after the monitoring unit update",
                                     "escalation thresholds revised", "record format changed",
                                     "service interval rule clarified at 180 days"]) + ".")
    checks = AIRCRAFT_SOP[AIRCRAFT_SOP.index("1. mechanical"):]  # the same rules, word for word
    return (_MANUAL_HEAD.format(checks=checks) + "\n".join(lines) + "\n" + _MANUAL_TAIL
            + "\n".join(history) + "\n")


AIRCRAFT_MANUAL = dict(AIRCRAFT, sop=_manual_sop())

# ----------------------------------------------------------------------- loan triage

LOAN_SOP = """\
Consumer loan triage procedure.

For one applicant (applicant_id), read the monthly income (get_income), the monthly debt
payments (get_debts) and the credit report (get_credit_report). Compute the debt-to-income
ratio DTI = monthly_debt_payments / monthly_income.

1. dti_band: "low" if DTI < 0.20, "medium" if 0.20 <= DTI < 0.40, otherwise "high".
2. decision:
   - "approve" if DTI < 0.40, the credit score is at least 650 and there are no recent
     defaults;
   - otherwise "review" if DTI < 0.50 and the credit score is at least 600;
   - otherwise "decline".
"""


def _loan_row(rng: random.Random, i: int) -> dict[str, str]:
    income = rng.randrange(2000, 12000, 50)
    dti_target = rng.choice([0.05, 0.15, 0.19, 0.2, 0.25, 0.35, 0.39, 0.4, 0.45, 0.49, 0.5, 0.7])
    debts = round(income * dti_target)
    score = rng.choice([540, 590, 600, 620, 649, 650, 700, 780])
    defaults = rng.choice([0, 0, 0, 1, 2])
    dti = debts / income
    band = "low" if dti < 0.20 else "medium" if dti < 0.40 else "high"
    if dti < 0.40 and score >= 650 and defaults == 0:
        decision = "approve"
    elif dti < 0.50 and score >= 600:
        decision = "review"
    else:
        decision = "decline"
    return {"applicant_id": f"APP-{rng.randint(10000, 99999)}-{i}",
            "monthly_income": str(income), "monthly_debt_payments": str(debts),
            "credit_score": str(score), "recent_defaults": str(defaults),
            "dti_band": band, "decision": decision}


LOAN = dict(
    sop=LOAN_SOP,
    key="applicant_id",
    inputs=["applicant_id"],
    outputs=["dti_band", "decision"],
    tools=[
        ("get_income", "Reads the applicant's monthly income.", [("monthly_income", "int")]),
        ("get_debts", "Reads the applicant's monthly debt payments.",
         [("monthly_debt_payments", "int")]),
        ("get_credit_report", "Reads the credit score and the number of recent defaults.",
         [("credit_score", "int"), ("recent_defaults", "int")]),
    ],
    row=_loan_row,
    not_found="Applicant {key} not found",
)

# ----------------------------------------------------------------------- preflight (demo)

PREFLIGHT_SOP = """\
Preflight check.

For the aircraft (aircraft_id), call each tool once, then record:
1. mechanical: inspect_mechanical; "pass" if the weight deviation is at most 1 kg, otherwise
   "fail".
2. electrical: inspect_electrical; "pass" if the battery is "operational" or "nominal",
   otherwise "fail".
3. serial: verify_serial; "match" if the serial's registry status is "listed" or "pending",
   otherwise ("recalled", "unlisted") "mismatch".
4. ready: "yes" if mechanical and electrical are "pass" and serial is "match", otherwise "no".
"""

PREFLIGHT_BATTERY = ("operational", "nominal", "degraded", "failed")
PREFLIGHT_REGISTRY = ("listed", "pending", "recalled", "unlisted")


def _preflight_row(rng: random.Random, i: int) -> dict[str, str]:
    deviation = rng.choice([0, 0, 1, 1, 2, 2, 3, 5])
    battery = rng.choice(PREFLIGHT_BATTERY)
    registry = rng.choice(PREFLIGHT_REGISTRY)
    mech = "pass" if deviation <= 1 else "fail"
    elec = "pass" if battery in ("operational", "nominal") else "fail"
    ser = "match" if registry in ("listed", "pending") else "mismatch"
    ready = "yes" if (mech, elec, ser) == ("pass", "pass", "match") else "no"
    return {"aircraft_id": f"U{rng.randint(10, 49)}", "deviation_kg": str(deviation),
            "battery": battery, "registry": registry, "mechanical": mech, "electrical": elec,
            "serial": ser, "ready": ready}


PREFLIGHT = dict(
    sop=PREFLIGHT_SOP,
    key="aircraft_id",
    inputs=["aircraft_id"],
    outputs=["mechanical", "electrical", "serial", "ready"],
    tools=[
        ("inspect_mechanical", "Weighs the component; returns its deviation from the expected "
         "weight in kg.", [("deviation_kg", "int")]),
        ("inspect_electrical", "Reads the battery status.", [("battery", "str")]),
        ("verify_serial", "Looks the installed serial up in the registry.",
         [("registry", "str")]),
    ],
    row=_preflight_row,
    not_found="Aircraft {key} not found",
    unique_keys=False,
)

_DEFS: dict[str, dict] = {"aircraft_inspection": AIRCRAFT, "aircraft_manual": AIRCRAFT_MANUAL,
                          "loan_triage": LOAN, "preflight": PREFLIGHT}


def generate_domain(name: str, out_dir: str | os.PathLike, *, sizes: dict[str, int] | None = None,
                    seed: int = 0) -> str:
    """Write domain ``name`` to ``out_dir`` (created); returns the folder path.

    ``sizes``: rows per split (default train 2000, val 200, test 200). Splits are drawn from
    disjoint random streams of the same seed, so growing one split never changes another.
    """
    if name not in _DEFS:
        raise KeyError(f"unknown synthetic SOP domain {name!r}; available: {list(_DEFS)}")
    d = _DEFS[name]
    sizes = sizes or {"train": 2000, "val": 200, "test": 200}
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sop.txt"), "w") as f:
        f.write(d["sop"])
    specs = [_spec(t, desc, d["key"], f"identifier of the case ({d['key']})")
             for t, desc, _ in d["tools"]]
    with open(os.path.join(out, "toolspecs.json"), "w") as f:
        json.dump(specs, f, indent=2)
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump({"name": name, "input_columns": d["inputs"], "output_columns": d["outputs"]},
                  f, indent=2)
    tool_map: dict = {"tools": {
        t: {"params": [d["key"]], "required": [[d["key"], "truthy"]],
            "missing": f"Missing required parameter: {d['key']}",
            "match": [[d["key"], d["key"], "str"]], "not_found": d["not_found"].replace(
                "{key}", "{" + d["key"] + "}"),
            "returns": [[c, c, k] for c, k in cols]} for t, _, cols in d["tools"]}}
    unique = d.get("unique_keys", True)
    if not unique:
        tool_map["rows"] = "task"  # keys repeat: answer from the episode's own row
    with open(os.path.join(out, "tool_map.json"), "w") as f:
        json.dump(tool_map, f, indent=2)
    make_row: Callable[[random.Random, int], dict[str, str]] = d["row"]
    for split_no, (split, n) in enumerate(sorted(sizes.items())):
        rng = random.Random(f"{name}:{seed}:{split}:{split_no}")
        rows = [make_row(rng, i) for i in range(n)]
        if unique:
            for r in rows:  # keys unique across splits: tools answer for any split's key
                r[d["key"]] = f"{r[d['key']]}-{split}"
        with open(os.path.join(out, f"{split}_set_with_outputs.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            w.writeheader()
            w.writerows(rows)
    return out
