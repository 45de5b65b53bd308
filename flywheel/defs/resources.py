"""Resources: one per settings section of ``flywheel/config.py``, generated from its model.

Each resource has the section's fields (so every one can be overridden per run in the Dagster
launchpad), with the values ``load_config()`` read from the environment as defaults; nothing is
declared here a second time. ``resource.settings()`` gives the validated section model that the
``lib`` functions take. The judge's API key is the one field that is not a setting: it is
attached through Dagster's ``EnvVar`` so that Dagster stores the variable's name, never the secret.
"""

from __future__ import annotations

import os
import types
from datetime import date
from pathlib import Path
from typing import Any, ClassVar, Optional, Union, get_args, get_origin

import dagster as dg
from pydantic import Field, create_model

from flywheel.config import SECTIONS, FlywheelConfig, Section, build_section, load_config
from flywheel.layout import Layout

API_KEY_ENV = "FLYWHEEL_JUDGE_API_KEY"


class SettingsResource(dg.ConfigurableResource):
    """Base of the generated resources: ``settings()`` is the section, validated."""

    section: ClassVar[type[Section]]

    def settings(self):
        values = {f: getattr(self, f) for f in self.section.model_fields}
        return build_section(self.section, values)


class PathsMixin:
    def layout(self) -> Layout:
        return Layout.of(self.settings())


def _config_type(annotation: Any) -> Any:
    """Dagster config takes str/int/float/bool and Optional of them; Path, date, Literal go as str."""
    if annotation in (str, int, float, bool):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return Optional[_config_type(args[0])] if len(args) == 1 else str
    return str


def _config_value(value: Any) -> Any:
    return str(value) if isinstance(value, (Path, date)) else value


def _resource_class(name: str, section: type[Section], defaults: Section, extra: dict | None = None):
    fields = {
        f: (_config_type(info.annotation), Field(default=_config_value(getattr(defaults, f)), description=info.description))
        for f, info in section.model_fields.items()
    }
    bases = (PathsMixin, SettingsResource) if name == "paths" else (SettingsResource,)
    cls = create_model(
        f"{section.__name__.removesuffix('Settings')}Resource", __base__=bases, __module__=__name__,
        __doc__=section.__doc__, **fields, **(extra or {}),
    )
    cls.section = section
    return cls


CONFIG: FlywheelConfig = load_config()
OPENAI_KEY_ENV = "OPENAI_API_KEY"  # sent only to OpenAI's own API (see lib.labels.endpoint.choose_api_key)
_EXTRA = {"judge": {
    "api_key": (Optional[str], Field(default=None, description=f"from ${API_KEY_ENV} (EnvVar)")),
    "openai_api_key": (Optional[str], Field(default=None, description=f"from ${OPENAI_KEY_ENV} (EnvVar); OpenAI's API only")),
}}
RESOURCE_CLASSES: dict[str, type[SettingsResource]] = {
    name: _resource_class(name, cls, getattr(CONFIG, name), _EXTRA.get(name)) for name, cls in SECTIONS.items()
}
PathsResource = RESOURCE_CLASSES["paths"]
TiersResource = RESOURCE_CLASSES["tiers"]
JudgeResource = RESOURCE_CLASSES["judge"]
TrainingResource = RESOURCE_CLASSES["training"]
RerankerResource = RESOURCE_CLASSES["reranker"]
GateResource = RESOURCE_CLASSES["gate"]


def resources_for(config: FlywheelConfig | None = None, **overrides: dict) -> dict[str, dg.ConfigurableResource]:
    """Resources for a configuration (default: the environment's), with per-section overrides,
    e.g. ``resources_for(cfg, training={"shuffle_labels": True})``. Values are validated here."""
    config = config or CONFIG
    if overrides:
        config = config.with_(**overrides)
    out: dict[str, dg.ConfigurableResource] = {}
    for name, cls in RESOURCE_CLASSES.items():
        section = getattr(config, name)
        values = {f: _config_value(getattr(section, f)) for f in type(section).model_fields}
        if name == "judge" and os.environ.get(API_KEY_ENV):
            # Dagster keeps the variable's name in the run config, never the secret
            values["api_key"] = dg.EnvVar(API_KEY_ENV)
        if name == "judge" and os.environ.get(OPENAI_KEY_ENV):
            values["openai_api_key"] = dg.EnvVar(OPENAI_KEY_ENV)
        out[name] = cls(**values)
    return out


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return resources_for(CONFIG)


def tracker_for(paths: SettingsResource, gate: SettingsResource):
    """MLflow tracking and registry for these paths (tracking URI, artifact root) and gate settings
    (experiment, registered model names are ``gate.settings().embedder_name`` / ``reranker_name``)."""
    from flywheel.lib.registry.tracking import Tracker

    p, g = paths.settings(), gate.settings()
    return Tracker(p.mlflow_uri, str(Layout.of(p).mlflow_artifacts), g.experiment)
