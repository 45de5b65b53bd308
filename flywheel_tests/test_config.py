"""One place for every setting: typed, validated at load with a one-line error, each default
written once, read from the environment only by flywheel/config.py, and documented in the README
from the same models."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import EXTRA_ENV, SECTIONS, ConfigError, load_config, settings_table_markdown

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flywheel"


@pytest.mark.parametrize("env, names", [
    ({"FLYWHEEL_SEED": "abc"}, ("FLYWHEEL_SEED", "'abc'", "integer")),
    ({"FLYWHEEL_EVAL_QUERIES": "0"}, ("FLYWHEEL_EVAL_QUERIES", "'0'", "greater than or equal to 1")),
    ({"FLYWHEEL_TRAIN_BATCH_SIZE": "0"}, ("FLYWHEEL_TRAIN_BATCH_SIZE", "'0'", "greater than or equal to 1")),
    ({"FLYWHEEL_TRAIN_LOSS": "triplet"}, ("FLYWHEEL_TRAIN_LOSS", "'triplet'", "'corpus', 'gist' or 'mnrl'")),
    ({"FLYWHEEL_RERANKER_FUSION": "max"}, ("FLYWHEEL_RERANKER_FUSION", "'zscore', 'rrf' or 'none'")),
    ({"FLYWHEEL_START_DATE": "2026-09-30"}, ("FLYWHEEL_START_DATE", "Monday", "Wednesday")),
    ({"FLYWHEEL_JUDGE": "gpt"}, ("FLYWHEEL_JUDGE", "'simulated' or 'openai'")),
    ({"FLYWHEEL_REGRESSION_MARGIN": "-1"}, ("FLYWHEEL_REGRESSION_MARGIN",)),
    ({"FLYWHEEL_TRAIN_LEARNING_RATE": "1e-4"}, ("FLYWHEEL_TRAIN_LEARNING_RATE", "not a flywheel setting")),
    ({"FLYWHEEL_LANCEDB_URI": "https://bucket/x"}, ("FLYWHEEL_LANCEDB_URI", "'https://bucket/x'", "s3://", "local folder")),
    ({"FLYWHEEL_LANCEDB_STORAGE_OPTIONS": "{aws_region: eu-west-1}"}, ("FLYWHEEL_LANCEDB_STORAGE_OPTIONS", "not JSON")),
    ({"FLYWHEEL_LANCEDB_STORAGE_OPTIONS": '["aws_region"]'}, ("FLYWHEEL_LANCEDB_STORAGE_OPTIONS", "JSON object")),
    ({"FLYWHEEL_LANCEDB_STORAGE_OPTIONS": '{"timeout": 60}'}, ("FLYWHEEL_LANCEDB_STORAGE_OPTIONS", "'timeout'", "string")),
])
def test_an_invalid_setting_is_one_line_naming_it_its_value_and_what_is_allowed(env, names):
    with pytest.raises(ConfigError) as err:
        load_config(env)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("key", ["aws_secret_access_key", "AWS_ACCESS_KEY_ID", "aws_session_token", "azure_storage_account_key",
                                 "google_service_account_key", "db_password"])
def test_lancedb_storage_options_refuse_credentials_without_repeating_them(key):
    with pytest.raises(ConfigError) as err:
        load_config({"FLYWHEEL_LANCEDB_STORAGE_OPTIONS": f'{{"aws_region": "eu-west-1", "{key}": "hunter2"}}'})
    message = str(err.value)
    assert "\n" not in message and "FLYWHEEL_LANCEDB_STORAGE_OPTIONS" in message and repr(key) in message
    assert "environment variable" in message and "hunter2" not in message


def test_lancedb_location_defaults_to_home_and_takes_object_storage_with_options():
    from flywheel.layout import Layout

    local = Layout.of(load_config({"FLYWHEEL_HOME": "/tmp/fw"}).paths).lancedb
    assert (local.uri, local.storage_options, local.is_local) == ("/tmp/fw/lancedb", (), True)
    options = '{"aws_region": "eu-west-1", "timeout": "60s", "aws_sse_kms_key_id": "arn:aws:kms:k"}'
    cfg = load_config({"FLYWHEEL_LANCEDB_URI": "s3://b/prod", "FLYWHEEL_LANCEDB_STORAGE_OPTIONS": options})
    store = Layout.of(cfg.paths).lancedb
    assert store.uri == "s3://b/prod" and not store.is_local
    assert dict(store.storage_options) == {"aws_region": "eu-west-1", "timeout": "60s", "aws_sse_kms_key_id": "arn:aws:kms:k"}
    assert str(store) == "s3://b/prod"  # what progress lines show: never the options


def test_values_come_from_the_environment_and_say_so():
    cfg = load_config({"FLYWHEEL_SEED": "7", "FLYWHEEL_TRAIN_LR": "2e-5", "FLYWHEEL_MINE_NEGATIVES": "0"})
    assert cfg.tiers.seed == 7 and cfg.training.learning_rate == 2e-5 and cfg.training.mine_negatives is False
    sources = {(r["section"], r["name"]): r["source"] for r in cfg.rows()}
    assert sources[("tiers", "seed")] == "env FLYWHEEL_SEED"
    assert sources[("training", "epochs")] == "default"
    assert load_config({}, tiers={"seed": 3}).sources["tiers.seed"] == "command"


def test_each_env_name_is_unique_and_every_field_is_documented():
    names = [cls.env_name(f) for cls in SECTIONS.values() for f in cls.model_fields]
    assert len(names) == len(set(names))
    assert all(info.description for cls in SECTIONS.values() for info in cls.model_fields.values())


def _package_sources():
    """The pipeline's code: lib, defs and the commands (services and test harnesses have settings
    of their own with coincidentally equal names, e.g. a server's timeout_s)."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if rel[0] in ("lib", "defs", "capture") or path.name in ("cli.py", "backfill.py", "layout.py"):
            yield path, path.read_text(encoding="utf-8")


def test_no_default_is_written_twice():
    """A field of the configuration given a default again elsewhere in the package (a dataclass
    field or keyword default with the same name and value) would drift: it must take the model's."""
    offenders = []
    for cls in SECTIONS.values():
        for name, info in cls.model_fields.items():
            default = info.default
            if isinstance(default, bool) or default in (None, "", 0, 1) or not isinstance(default, (int, float, str)):
                continue  # too common to mean anything
            pattern = re.compile(rf"\b{name}\s*(?::\s*[\w\[\]|., ]+)?=\s*{re.escape(repr(default))}(?![\w.])")
            for path, text in _package_sources():
                for m in pattern.finditer(text):
                    offenders.append(f"{path.relative_to(REPO)}: {m.group(0)}")
    assert not offenders, "defaults written outside flywheel/config.py:\n" + "\n".join(offenders)


def test_only_the_loader_reads_flywheel_settings_from_the_environment():
    """lib and defs never read os.environ (secrets reach Dagster through EnvVar in defs/resources.py)."""
    raw = re.compile(r"os\.(environ|getenv)")
    offenders = [str(p.relative_to(REPO)) for p, text in _package_sources()
                 if raw.search(text) and p.parts[-2] in ("lib", "defs", "logs", "labels", "datasets", "training",
                                                         "evaluation", "registry", "simulate")
                 and p.name != "resources.py"]
    assert not offenders, offenders
    env_literals = set()
    for path, text in _package_sources():
        env_literals |= set(re.findall(r"[\"'](FLYWHEEL_[A-Z0-9_]+)[\"']", text))
    known = {cls.env_name(f) for cls in SECTIONS.values() for f in cls.model_fields} | EXTRA_ENV
    assert env_literals <= known, sorted(env_literals - known)


def test_the_readme_settings_table_is_generated_from_the_models():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert settings_table_markdown() in readme, "regenerate: python -c 'from flywheel.config import settings_table_markdown as t; print(t())'"


def _cli(*args, env=None):
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli_stops_before_any_work_with_one_line():
    bad = _cli("run", "--week", "2026-10-07")  # a Wednesday
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "is a Wednesday" in bad.stderr and "2026-10-05" in bad.stderr
    seed = _cli("config", env={"FLYWHEEL_SEED": "abc"})
    assert seed.returncode == 2 and seed.stderr.strip() == (
        "flywheel: FLYWHEEL_SEED='abc' is not allowed: Input should be a valid integer, unable to parse string as an integer")


def test_flywheel_config_prints_every_setting_with_its_source():
    out = _cli("config", env={"FLYWHEEL_EVAL_QUERIES": "30"})
    assert out.returncode == 0, out.stderr
    for cls in SECTIONS.values():
        for f in cls.model_fields:
            assert cls.env_name(f) in out.stdout
    line = next(line for line in out.stdout.splitlines() if "FLYWHEEL_EVAL_QUERIES" in line)
    assert " 30 " in line and "(env FLYWHEEL_EVAL_QUERIES)" in line


def test_the_first_week_draws_a_bigger_eval_set_and_zero_means_the_weekly_size():
    """The gate's cold start: the first week has no earlier eval sets, so it draws more queries."""
    tiers = load_config({}).tiers
    assert tiers.eval_queries_in(tiers.start_date.isoformat()) == tiers.first_week_eval_queries > tiers.eval_queries
    assert tiers.eval_queries_in("2026-10-05") == tiers.eval_queries
    same = load_config({"FLYWHEEL_FIRST_WEEK_EVAL_QUERIES": "0"}).tiers
    assert same.eval_queries_in(same.start_date.isoformat()) == same.eval_queries
