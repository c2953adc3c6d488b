"""User tasks without editing the package: task families registered by user modules, and the
examples in examples/ loaded exactly as a user would."""

import os
import sys

import pytest

from mtrl_jax.envs.base import Task
from mtrl_jax.envs.families import (
    FAMILIES,
    TaskFamily,
    import_user_modules,
    load_tasks,
    make_env,
    register_family,
    reward_kinds,
)
from mtrl_jax.rollout.env_check import env_check, format_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILY_MODULE = '''
from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.envs.families import TaskFamily, final_output_text, register_family
from mtrl_jax.envs.scoring import strict_score


class Echo(Environment):
    def __init__(self, reward):
        self.kind = reward

    def reward(self, episode):
        score = strict_score(episode.final_text, episode.task.expected)
        episode.update_reward(score if self.kind == "exact" else 0.5 * score)


def tasks(name, split, n, seed):
    return [Task(id=f"{name}/{split}/{i}", family="{family}", name=name, prompt=f"Say {i}.",
                 expected={"said": i}) for i in range(n or 4)]


FAMILY = register_family(TaskFamily(
    name="{family}", names=("say",), tasks=tasks, make_env=lambda t, reward: Echo(reward),
    oracle=lambda t: [final_output_text(t.expected)], rewards=("exact", "half")))
'''


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Families registered by a test, and the user modules that registered them, are forgotten
    after it (a module still imported would not register its family again)."""
    monkeypatch.setattr(FAMILIES, "_entries", dict(FAMILIES._entries))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("_mtrl_user_"):
            del sys.modules[name]


def write_family(path, family="echo"):
    path.write_text(FAMILY_MODULE.replace("{family}", family))
    return str(path)


def test_a_family_module_from_a_py_file_registers_once(tmp_path):
    spec = write_family(tmp_path / "echo_family.py")
    (module,) = import_user_modules([spec])
    assert FAMILIES.get("echo") is module.FAMILY
    assert import_user_modules([spec]) == [module]  # imported again: the same module, no error
    register_family(module.FAMILY)  # the same object again: a no-op
    tasks = load_tasks("echo:say", "test", n=2)
    assert [t.prompt for t in tasks] == ["Say 0.", "Say 1."]
    assert reward_kinds("echo:say") == ("exact", "half")
    assert make_env(tasks[0]).kind == "exact" and make_env(tasks[0], "half").kind == "half"
    with pytest.raises(ValueError, match=r"no reward 'dense'.*\['exact', 'half'\]"):
        make_env(tasks[0], "dense")
    with pytest.raises(KeyError, match=r"unknown task 'echo:shout'.*\['echo:say'\]"):
        load_tasks("echo:shout")
    report = env_check("echo:say")
    assert report.ok and report.oracle.strict_success == 1.0 and report.n == 4


def test_another_family_under_a_registered_name_is_refused(tmp_path):
    import_user_modules([write_family(tmp_path / "a.py")])
    with pytest.raises(ImportError, match=r"user module '.*b\.py'.*already registered"):
        import_user_modules([write_family(tmp_path / "b.py")])
    with pytest.raises(ValueError, match="'math' is already registered"):
        register_family(TaskFamily(name="math", names=("x",), tasks=lambda *a: [],
                                   make_env=lambda t, r: None))


def test_a_dotted_module_is_found_in_the_working_directory(tmp_path, monkeypatch):
    write_family(tmp_path / "mtrl_test_dotted_family.py", family="dotted")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mtrl_test_dotted_family", raising=False)
    (module,) = import_user_modules(["mtrl_test_dotted_family"])
    assert module.__name__ == "mtrl_test_dotted_family" and "dotted" in FAMILIES
    monkeypatch.delitem(sys.modules, "mtrl_test_dotted_family")


def test_import_errors_name_the_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"user module 'nowhere/fam\.py': no such file"):
        import_user_modules(["nowhere/fam.py"])
    broken = tmp_path / "broken_family.py"
    broken.write_text("def tasks(:\n")
    with pytest.raises(ImportError, match=r"user module '.*broken_family\.py'.*SyntaxError"):
        import_user_modules([str(broken)])
    assert not any("broken_family" in name for name in sys.modules)  # nothing half-imported
    with pytest.raises(ImportError, match=r"user module 'no_such_module_xyz' failed"):
        import_user_modules(["no_such_module_xyz"])
    with pytest.raises(TypeError, match="a list of module specs"):
        import_user_modules("fam.py")


def test_task_family_fields_are_checked():
    with pytest.raises(ValueError, match="without ':'"):
        TaskFamily(name="a:b", names=(), tasks=lambda *a: [], make_env=lambda t, r: None)
    with pytest.raises(ValueError, match="non-empty tuple"):
        TaskFamily(name="a", names=(), tasks=lambda *a: [], make_env=lambda t, r: None,
                   rewards=())
    register_family(TaskFamily(name="no_oracle", names=("x",), make_env=lambda t, r: None,
                               tasks=lambda *a: [Task(id="t", family="no_oracle", name="x",
                                                      prompt="p")]))
    with pytest.raises(ValueError, match="'no_oracle' has no oracle"):
        env_check("no_oracle:x")


# ------------------------------------------------------------------------------ examples/


def test_the_examples_load_as_a_user_would_and_their_oracles_succeed(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MTRL_SOP_BENCH_DIR", "examples")
    sop = env_check("sop_bench:sop_domain")
    assert sop.ok and sop.oracle.strict_success == 1.0 and sop.n == sop.total == 6
    assert sop.random.strict_success == 0.0
    assert sop.oracle.tool_calls == {"get_member": 6, "get_item": 6}

    import_user_modules(["examples/my_family.py"])
    family = env_check("warehouse:stock", n=12)
    assert family.ok and family.oracle.strict_success == 1.0 and family.total == 50
    assert "12 of 50 tasks, sampled with seed 0" in format_report(family)
    assert reward_kinds("warehouse:stock") == ("dense", "strict")
