"""SOP-Bench domains (evaluation only): replayed tools give the benchmark's own results.

Expected strings below are what the benchmark's tools.py returns (json.dumps of the result, or
"Error: <message>"), as read from amazon-science/SOP-Bench and checked against its data.
The data is read from $MTRL_SOP_BENCH_DIR (tests/conftest.py points it at ../shared/sop-bench,
beside the clone). Where the data is absent these tests are skipped with the reason shown, except
in CI (CI set), where an absent folder fails them: CI must run them. The loader itself is tested
without this data in tests/test_sop_format.py.
"""

import asyncio
import os

import pytest

from mtrl_jax.envs.base import ToolError
from mtrl_jax.envs.families import (
    SOP_BENCH_DOMAINS,
    load_tasks,
    make_env,
    sop_bench_folder,
    sop_bench_roots,
)
from mtrl_jax.envs.tools import ToolCall
from mtrl_jax.rollout.env_check import env_check

_ABSENT = [d for d in SOP_BENCH_DOMAINS if sop_bench_folder(d) is None]


@pytest.fixture(autouse=True)
def _sop_bench_data():
    if _ABSENT:
        why = (f"SOP-Bench data absent: {_ABSENT} not found under MTRL_SOP_BENCH_DIR="
               f"{os.pathsep.join(sop_bench_roots()) or '(unset)'}")
        if os.environ.get("CI"):
            pytest.fail(why + " (CI must run these tests)")
        pytest.skip(why)


def call(domain, name, **args):
    task = load_tasks(f"sop_bench:{domain}", "test", n=1)[0]
    env = make_env(task)

    async def go():
        await env.setup(task)
        try:
            return await env.call_tool(ToolCall(name, args))
        except ToolError as e:
            return f"Error: {e}"

    return asyncio.run(go())


def test_referral_results_match_the_benchmark():
    assert call("referral_abuse_detection_v1", "investigate_account", account_id="ACC100000") == (
        '{"account_id": "ACC100000", "address_validity": false, "email_pattern_suspicious": '
        'true, "website_verified": false, "business_description": "Project management tool", '
        '"account_status": "Suspended", "connected_accounts": 20, '
        '"login_geographic_consistency": false}')
    assert call("referral_abuse_detection_v1", "analyze_traffic_patterns",
                account_id="ACC100000") == (
        '{"account_id": "ACC100000", "revenue_amount": 37.04, "click_through_rate": 0.52, '
        '"page_views": 838, "device_distribution": "Mixed", "referral_source_quality": "High", '
        '"payment_method_shared": true, "order_patterns_suspicious": true}')
    assert call("referral_abuse_detection_v1", "investigate_account", account_id="NOPE") == \
        "Error: Account not found: NOPE"
    out = call("referral_abuse_detection_v1", "determine_enforcement_action", account_id="ZZZ")
    assert out.startswith('{"account_id": "ZZZ", "enforcement_guidelines": {"Abusive Account '
                          'Creation": "Account Closure"')


def test_customer_service_results_match_the_benchmark():
    cs = "customer_service"
    assert call(cs, "validateAccount", account_id="BCD-89012") == (
        '{"is account id valid": true, "reason": "The account ID conforms to the '
        "organization's standard pattern\"}")
    assert call(cs, "validateAccount", account_id="QQQ-00000") == (
        '{"is account id valid": false, "reason": "Account ID QQQ-00000 not found in records"}')
    assert call(cs, "getAuthenticationDetails", account_id="BCD-89012",
                is_account_id_valid=True) == (
        '{"authentication records": {"timestamp_last_login": "2025-05-02T07:00:00Z", '
        '"login_status": "SUCCESS", "account_recovery_status": ""}}')
    assert call(cs, "getAuthenticationDetails", account_id="BCD-89012",
                is_account_id_valid="True") == \
        "Error: No record found for the provided parameters"  # a string is not a bool
    assert call(cs, "getAuthenticationDetails", account_id="BCD-89012",
                is_account_id_valid=False) == "Error: Invalid account ID provided"
    assert call(cs, "checkAccountStatus", account_id="BCD-89012") == (
        "Error: ServiceAccountManager.checkAccountStatus() missing 1 required positional "
        "argument: 'session_token'")
    assert call(cs, "validateAccount", account_id="BCD-89012", foo=1) == (
        "Error: ServiceAccountManager.validateAccount() got an unexpected keyword argument "
        "'foo'")
    token = "SES-20250510-BCD89012-001"
    assert call(cs, "createSessionAndOpenTicket", account_id="BCD-89012",
                is_account_id_valid=True, is_authenticated=True) == (
        f'{{"session token": "{token}", "ticket identifer": "TKT-2025051266"}}')
    outage = call(cs, "checkServiceAreaOutage", account_id="BCD-89012", session_token=token,
                  service_area_code="SA-89012")
    assert outage.startswith('{"outage detected": true, "outage id": "OUT-2025051241", '
                             '"radius miles": "5.6", "outage impact score": 1.0')
    assert call(cs, "executeTroubleshooting", account_id="BCD-89012", session_token=token,
                root_causes=["X"]) == "Error: Incorrect root causes: ['X']"
    assert call(cs, "executeTroubleshooting", account_id="BCD-89012", session_token=token,
                root_causes=[]) == "Error: Missing required parameters"


def test_traffic_results_are_json_quoted_strings():
    ts = "traffic_spoofing_detection"
    task = load_tasks(f"sop_bench:{ts}", "test", n=1)[0]
    row = task.data["row"]
    out = call(ts, "AnalyzeTrafficPatterns", partner_id=row["partner_id"], engagement_score=1.0,
               conversion_rate=0.1, bounce_rate=50.0)
    assert out == f'"{row["traffic_analysis_result"]}"'
    assert call(ts, "AnalyzeTrafficPatterns", partner_id="NOPE", engagement_score=1.0,
                conversion_rate=0.1, bounce_rate=5.0) == \
        "Error: No data found for given partner_id."
    assert call(ts, "InvestigateViolations", partner_id=row["partner_id"],
                registered_websites=[], earnings_amount=1.0) == \
        "Error: Missing required input fields."


def test_prompt_lists_inputs_in_csv_order_with_nan():
    task = load_tasks("sop_bench:customer_service", "test")[0]
    assert task.prompt.startswith("Process this task according to the SOP:\n\naccount_id: ")
    assert set(task.expected) == {"final_resolution_status"}
    with pytest.raises(ValueError, match="evaluation only"):
        load_tasks("sop_bench:customer_service", "train")


@pytest.mark.parametrize("domain", SOP_BENCH_DOMAINS)
def test_env_check_on_sop_bench(domain):
    report = env_check(f"sop_bench:{domain}", n=40)
    assert report.ok and report.oracle.strict_success == 1.0
    assert report.random.strict_success <= 0.1
