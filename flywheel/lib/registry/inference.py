"""Inference precision: fp32, bf16 or int8 weights for encoding and reranking.

On a CPU with AVX-512 BF16 (or AMX) a bf16 matrix multiply runs several times faster than fp32,
and a small encoder such as MiniLM keeps its embeddings (cosine to fp32 above 0.999): casting the
model's weights to bfloat16 is the cheap win. ``int8`` is PyTorch's dynamic quantization of every
``nn.Linear`` (per-channel int8 weights, activations quantized on the fly; VNNI kernels): smaller
on disk and in memory, but further from fp32 than bf16 (see the benchmark's side-by-side).

``openvino-bf16`` and ``openvino-int8`` run the model's network on OpenVINO instead of PyTorch
(compiled CPU kernels; int8 by NNCF post-training quantization on calibration texts): see
``registry.openvino_backend``. They need the ``openvino`` and ``nncf`` packages and a CPU.

``auto`` picks ``openvino-int8`` on a CPU where those packages are installed (the fastest, and its
retrieval quality matched fp32's in ``benchmarks/retrieval.py``); without them, bf16 where the CPU
runs it natively and fp32 elsewhere (emulated bf16 is slower than fp32); on a GPU, bf16 where
supported, else fp32.

Queries and documents may run at different precisions (``query_precision``): int8 activations
cost a query encoder more retrieval quality than they cost the corpus, while one short query
gains nothing from int8's throughput. ``auto`` queries run at ``openvino-bf16`` where the corpus
runs at ``openvino-int8`` (OpenVINO's f32 kernels where the CPU has no native bf16), and at the
corpus's precision otherwise. A model whose two sides differ is a query/document ``Router``: a
single-tower model gets a copy of itself as its query route (:func:`with_query_route`).

Embeddings always come back as float32, whatever the weights: LanceDB tables and scores do not
change type. A corpus encoded at a precision other than fp32 gets a table of its own (the
precision is part of the table name), so fp32 and bf16 runs never mix their vectors.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import get_args

from flywheel.config import InferencePrecision, TrainingPrecision

OPENVINO_PRECISIONS = ("openvino-bf16", "openvino-int8")
SETTING_CHOICES = get_args(InferencePrecision)
PRECISIONS = tuple(p for p in SETTING_CHOICES if p != "auto")
TRAINING_CHOICES = get_args(TrainingPrecision)
SETTINGS = "FLYWHEEL_ENCODE_PRECISION / FLYWHEEL_QUERY_PRECISION / FLYWHEEL_RERANKER_PRECISION"
ATTR = "flywheel_precision"  # set on a model once its precision is applied (its documents', for an embedder)
QUERY_ATTR = "flywheel_query_precision"  # set on an embedder whose queries run at another precision


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX-512 BF16 or AMX BF16 (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto`` -> ``openvino-int8`` on a CPU with OpenVINO installed, else ``bf16`` where it runs
    natively, else ``fp32``; anything else is checked."""
    if precision not in SETTING_CHOICES:
        raise ValueError(f"inference precision {precision!r} is not one of {SETTING_CHOICES}")
    on_cuda = str(device).startswith("cuda")
    if precision == "auto":
        if on_cuda:
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if openvino_installed():
            return "openvino-int8"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "int8" and on_cuda:
        raise ValueError("inference precision 'int8' (PyTorch dynamic quantization) runs on the CPU only; "
                         "use 'bf16' or 'fp32' on a GPU")
    if precision in OPENVINO_PRECISIONS and on_cuda:
        raise ValueError(f"inference precision {precision!r} (OpenVINO's CPU runtime) runs on the CPU only; "
                         "use 'bf16' or 'fp32' on a GPU")
    return precision


def resolve_query_precision(query_precision: str, corpus_precision: str, device: str = "cpu") -> str:
    """The precision queries are encoded at: ``auto`` -> ``openvino-bf16`` where the corpus (already
    resolved) runs at ``openvino-int8``, else the corpus's own; anything else is checked."""
    if query_precision == "auto":
        return "openvino-bf16" if corpus_precision == "openvino-int8" else corpus_precision
    return resolve_precision(query_precision, device)


def training_bf16(precision: str, device: str = "cpu") -> bool:
    """Train in bf16 mixed precision (the trainer's ``bf16``: autocast, fp32 master weights)?
    ``auto``: where bf16 runs natively (a CPU with AVX512-BF16 or AMX, a GPU with bf16)."""
    if precision not in TRAINING_CHOICES:
        raise ValueError(f"training precision {precision!r} is not one of {TRAINING_CHOICES}")
    if precision != "auto":
        return precision == "bf16"
    if str(device).startswith("cuda"):
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def _missing_openvino_packages(precision: str = "openvino-int8") -> list[str]:
    import importlib.util

    needed = ["openvino"] + (["nncf"] if precision == "openvino-int8" else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


@functools.lru_cache(maxsize=1)
def openvino_installed() -> bool:
    return not _missing_openvino_packages()


def require_openvino(precision: str) -> None:
    """A clear error, naming the settings, when the OpenVINO precisions' packages are missing."""
    missing = _missing_openvino_packages(precision)
    if missing:
        raise ImportError(f"inference precision {precision!r} ({SETTINGS}) needs the {' and '.join(missing)} "
                          f"package(s): pip install {' '.join(missing)}, or choose fp32, bf16 or int8")


def apply_precision(model, precision: str, device: str = "cpu", *, query_precision: str | None = None,
                    calibration_texts=None, cache_dir: str | Path | None = None):
    """Cast (bf16), quantize (int8) or compile on OpenVINO a SentenceTransformer or CrossEncoder in place.

    Returns the model; ``precision_of(model)`` then tells what it runs at. Training a model after
    this is not supported: load a fresh copy to train. ``query_precision`` (an embedder's; ``auto``
    or a precision; default: the same as ``precision``) runs the query route of a query/document
    ``Router`` at its own precision (see :func:`with_query_route`). ``calibration_texts`` (passages,
    in a fixed order) calibrate ``openvino-int8`` (default: a small generic set); ``cache_dir`` keeps
    the converted OpenVINO networks so that loading the same model again skips the conversion."""
    import torch

    precision = resolve_precision(precision, device)
    query = resolve_query_precision(query_precision, precision, device) if query_precision else precision
    current = (precision_of(model), query_precision_of(model))
    if current == (precision, query):
        return model
    if current != ("fp32", "fp32"):
        raise ValueError(f"model already runs at {current[0]} (queries {current[1]}); load a fresh copy for {precision}")
    options = dict(device=device, calibration_texts=calibration_texts, cache_dir=cache_dir)
    if query == precision:
        _apply(model, model if isinstance(model, torch.nn.Module) else model.model, precision, **options)
    else:
        routes = query_document_routes(model)
        _apply(model, routes["document"], precision, **options)
        _apply(model, routes["query"], query, **options)
        setattr(model, QUERY_ATTR, query)
    setattr(model, ATTR, precision)
    return model


def _apply(model, module, precision: str, *, device: str, calibration_texts, cache_dir) -> None:
    """One precision on ``module`` (the whole model, or one route of it)."""
    import torch

    if precision in OPENVINO_PRECISIONS:
        require_openvino(precision)
        from flywheel.lib.registry.openvino_backend import run_on_openvino, transformer_modules

        run_on_openvino(model, precision, bf16=cpu_has_native_bf16(), threads=torch.get_num_threads(),
                        calibration_texts=calibration_texts, cache_dir=cache_dir,
                        modules=transformer_modules(module))
    elif precision == "bf16":
        module.to(torch.bfloat16)
    elif precision == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch.ao's eager quantization warns that it is moving to torchao
            warnings.simplefilter("ignore")
            quantize_dynamic(module, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def query_document_routes(model) -> dict:
    """route name -> the modules of that route, for a SentenceTransformer built on a query/document
    ``Router``; an error for any other model."""
    router = _router(model)
    if router is None or not {"query", "document"} <= set(router.sub_modules):
        raise ValueError(f"{type(model).__name__} has no query and document routes: load it with "
                         "index.load_embedder (which gives a single-tower model a query route) to run its "
                         "queries at another precision")
    return dict(router.sub_modules)


def _router(model):
    """The model's ``Router``, where a SentenceTransformer is built on one; else None."""
    from sentence_transformers.base.modules import Router

    modules = list(model.children()) if hasattr(model, "children") else []
    return modules[0] if len(modules) == 1 and isinstance(modules[0], Router) else None


def with_query_route(model):
    """A query/document ``Router`` model made of a single-tower SentenceTransformer: the document route
    is the model's own modules, the query route a copy of them (the same weights, so the same
    embeddings at the same precision). A model that already routes is returned as it is."""
    import copy

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Router

    if _router(model) is not None:
        return model
    modules = list(model.children())
    router = Router.for_query_document(query_modules=[copy.deepcopy(m) for m in modules], document_modules=modules)
    routed = SentenceTransformer(modules=[router], device=str(model.device))
    routed.max_seq_length = model.max_seq_length
    return routed


def precision_of(model) -> str:
    """What the model runs at (an embedder's documents; its queries too unless they differ)."""
    return getattr(model, ATTR, "fp32")


def query_precision_of(model) -> str:
    """What an embedder's queries run at."""
    return getattr(model, QUERY_ATTR, precision_of(model))


def precision_label(model) -> str:
    """``openvino-int8``, or ``openvino-int8 (queries openvino-bf16)`` where the two sides differ."""
    return sides_label(precision_of(model), query_precision_of(model))


def sides_label(corpus: str, query: str) -> str:
    """The label of a corpus precision and a query precision (one name where they are the same)."""
    return corpus if corpus == query or not query else f"{corpus} (queries {query})"


def runtime_weights_mb(model) -> float | None:
    """Megabytes of the weights of a model running on OpenVINO (its IR as saved, plus any route left
    on PyTorch); None for a model wholly on PyTorch."""
    from flywheel.lib.registry.openvino_backend import transformer_modules

    modules = transformer_modules(model)
    compiled = [m for m in modules if hasattr(m.model, "weights_mb")]
    if not compiled:
        return None
    return sum(m.model.weights_mb for m in compiled) + sum(state_dict_mb(m) for m in modules if m not in compiled)


def state_dict_mb(module) -> float:
    """Megabytes of a torch module's state dict as ``torch.save`` writes it."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell() / 1e6


def table_suffix(precision: str) -> str:
    """Part of a corpus table's name: empty for fp32 (the tables written before precisions existed)."""
    return "" if precision == "fp32" else "_" + precision.replace("-", "_")
